#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in parts that each fit one 10-minute command on a
# bare, offline GPU machine (an H100 through this workplace's device tool, or your own box).
#
#     bash bench/gpu_wheels.sh              # once, where pip works: the wheels into .whl/
#     bash bench/gpu_suite.sh small         # Qwen2.5-1.5B: ours vs TRL (1+2 steps), OOM back-off demo
#     bash bench/gpu_suite.sh qwen2.5-7b    # ours vs TRL, 1 warm-up + 1 measured step each
#     bash bench/gpu_suite.sh llama-3.1-8b  # likewise
#     bash bench/gpu_suite.sh qwen2.5-7b ours   # one trainer only, when both do not fit one command:
#     bash bench/gpu_suite.sh qwen2.5-7b trl    #   results are kept in .benchwork/ (carry it along)
#
# Every part installs the carried wheels (if any) into /tmp/site, prints the library versions,
# runs under `timeout` so it ends before the command limit, and leaves in $OUT (when set): the
# updated docs/benchmarks.md and a tarball of .benchwork/ (settings, saved results, logs).
# Each architecture's section of docs/benchmarks.md is written by bench_grpo.py itself, with the
# planner-vs-measured line; copy the returned benchmarks.md over docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: gpu_suite.sh small|qwen2.5-1.5b|qwen2.5-7b|llama-3.1-8b [ours|trl]}
ONLY=${2:-}
LIMIT=${SUITE_TIMEOUT_S:-560}  # seconds for the whole part: under the device tool's 600
started=$SECONDS

if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && touch /tmp/site/.installed || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'EOF' || exit 1
import importlib.metadata as md
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate", "pyarrow"):
    print(f"{name} {md.version(name)}")
import bitsandbytes, datasets, trl  # fail here, not ten minutes in
EOF

left() {  # seconds left for this part (at least 1: `timeout 0` would mean no limit at all)
    local s=$((LIMIT - (SECONDS - started)))
    echo $((s > 0 ? s : 1))
}
bench() {  # bench ARCH [extra args]: ours vs TRL (or --only) with the work dir kept in .benchwork
    local arch=$1; shift
    timeout "$(left)" python3 bench/bench_grpo.py --device cuda --arch "$arch" \
        --work-dir ".benchwork/cuda-$arch" ${ONLY:+--only "$ONLY"} "$@"
}
status=0
case "$PART" in
    small)
        bench qwen2.5-1.5b || status=1
        timeout "$(left)" python3 bench/oom_backoff.py --arch qwen2.5-1.5b || status=1
        ;;
    qwen2.5-1.5b) bench qwen2.5-1.5b || status=1 ;;
    qwen2.5-7b | llama-3.1-8b | qwen2.5-3b | llama-3.2-3b | qwen2.5-0.5b) bench "$PART" --steps 1 || status=1 ;;
    *) echo "unknown part: $PART" >&2; exit 2 ;;
esac

if [ -n "${OUT:-}" ]; then
    cp docs/benchmarks.md "$OUT/benchmarks.md"
    tar czf "$OUT/benchwork.tgz" .benchwork 2>/dev/null
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
echo "part $PART finished in $((SECONDS - started)) s with status $status"
exit $status
