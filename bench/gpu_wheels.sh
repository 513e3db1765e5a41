#!/usr/bin/env bash
# Download, into .whl/, the wheels that a bare GPU machine without internet needs to run the
# benchmarks in bench/ (see bench/gpu_suite.sh): the packages its image lacks (bitsandbytes,
# trl, datasets and two of datasets' own needs) plus transformers and peft at the versions CI
# tests, so that the GPU figures come from the same library code as the CPU ones. torch stays
# the machine's own CUDA build.
#
#     bash bench/gpu_wheels.sh          # on a machine with pip access; ~57 MiB, Python 3.12 wheels
#
# .whl/ is git-ignored. Each wheel is pinned to the version installed in this checkout's .venv
# (the one `scripts/test` builds), falling back to the versions below.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3
declare -A FALLBACK=(
    [bitsandbytes]=0.50.2 [trl]=1.16.0 [datasets]=5.2.0 [dill]=0.4.1 [multiprocess]=0.70.19
    [transformers]=5.23.0 [peft]=0.21.2
)
specs=()
for name in "${!FALLBACK[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null \
              || echo "${FALLBACK[$name]}")
    specs+=("$name==$version")
done

rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
ls -1 .whl
du -sh .whl
