#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one command, within 8 minutes of starting on a
# bare, offline GPU machine (see bench/gpu_suite.py for the parts and their time budgets).
#
#     bash bench/gpu_wheels.sh           # once, where pip works: the wheels into .whl/ (carry it along)
#     bash bench/gpu_suite.sh            # on the GPU machine
#     bash bench/gpu_suite.sh --dry-run  # the same plumbing on the CPU with tiny shapes (< 2 minutes)
#
# Installs the carried wheels (if any; not in a dry run) into /tmp/site, prints the library
# versions, then runs `python -m bench.gpu_suite` with a deadline SUITE_TOTAL_S (480) seconds
# after this script started. The parts write their sections of docs/benchmarks.md and raw
# results into .benchwork/; with $OUT set, the updated benchmarks.md and benchwork.tgz (the raw
# results) are copied there: copy that benchmarks.md over docs/benchmarks.md.
# Extra arguments go to bench.gpu_suite (e.g. --budget compare=240, --parts profile).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
TOTAL=${SUITE_TOTAL_S:-480}
PYTHON=${PYTHON:-python3}
dry_run=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done

if [ $dry_run = 0 ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.installed ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && touch /tmp/site/.installed || exit 1
fi
[ $dry_run = 0 ] && [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" - "$dry_run" <<'PY' || exit 1
import importlib.metadata as md
import sys
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate"):
    print(f"{name} {md.version(name)}")
import bitsandbytes, datasets, trl  # fail here, not minutes in
if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit("error: torch sees no GPU; on a CPU run `bash bench/gpu_suite.sh --dry-run`")
PY

echo "setup took $(($(date +%s) - started)) s"
"$PYTHON" -m bench.gpu_suite --deadline "$((started + TOTAL))" ${OUT:+--out "$OUT"} "$@"
status=$?
[ $dry_run = 0 ] && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
echo "gpu_suite.sh finished in $(($(date +%s) - started)) s with status $status"
exit $status
