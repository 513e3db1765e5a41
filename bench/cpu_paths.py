"""The offline demo gives the same per-step rewards whichever CPU path bitsandbytes would take.

Runs `lowvram-grpo train --preset tiny-cpu` twice, in fresh processes, with bitsandbytes told
that the CPU has AVX512-BF16 (the path that repacks 4-bit weights for inference) and that it
has not, and compares the two runs' rewards step by step. Before the fix in quantization.py
the first run crashed at step 1 on such CPUs.

    python -m bench.cpu_paths
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import add_output_arguments, command_line, device_description, update_docs, versions

TRAIN_WITH_REPORTED_FEATURE = """
import sys
from lowvram_grpo.quantization import import_bitsandbytes
bnb = import_bitsandbytes()
reported = sys.argv[1] == "reported"
bnb.functional.has_avx512bf16 = bnb.nn.modules.has_avx512bf16 = lambda: reported
from lowvram_grpo.cli import main
sys.exit(main(["train", "--preset", "tiny-cpu", "--no-progress", "--output-dir", sys.argv[2]]))
"""


def run_demo(reported: bool, out: Path) -> tuple[list[float], float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", TRAIN_WITH_REPORTED_FEATURE,
                             "reported" if reported else "absent", str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the demo failed with the feature {'reported' if reported else 'absent'}:\n"
                         + result.stderr[-3000:])
    rewards = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rewards, seconds, result.stdout + result.stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    from lowvram_grpo.quantization import import_bitsandbytes

    has_feature = import_bitsandbytes().functional.has_avx512bf16()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {reported: run_demo(reported, Path(tmp) / ("reported" if reported else "absent"))
                for reported in (True, False)}
    (with_rewards, with_seconds, with_log), (without_rewards, without_seconds, without_log) = runs[True], runs[False]
    tenth = len(with_rewards) // 10
    first, last = sum(with_rewards[:tenth]) / tenth, sum(with_rewards[-tenth:]) / tenth
    kernel_lines = sum("kernels-community" in log for log in (with_log, without_log))
    body = f"""## The demo on both bitsandbytes CPU paths: CPU

Command: `{command_line('bench.cpu_paths', argv)}`

Measured {time.strftime('%Y-%m-%d')} on {device_description('cpu')} (AVX512-BF16: {'yes' if has_feature else 'no'}),
{', '.join(f'{k} {v}' for k, v in versions().items())}. `lowvram-grpo train --preset tiny-cpu`, run twice in
fresh processes, with bitsandbytes told that the CPU has AVX512-BF16 and that it has not.

| bitsandbytes told | steps | reward, first tenth | reward, last tenth | wall time |
| --- | --- | --- | --- | --- |
| AVX512-BF16 present | {len(with_rewards)} | {first:.3f} | {last:.3f} | {with_seconds:.1f} s |
| AVX512-BF16 absent | {len(without_rewards)} | {sum(without_rewards[:tenth]) / tenth:.3f} | {sum(without_rewards[-tenth:]) / tenth:.3f} | {without_seconds:.1f} s |

Per-step rewards identical: {'yes, all ' + str(len(with_rewards)) + ' steps' if with_rewards == without_rewards else 'NO'}.
Output lines naming kernels-community: {kernel_lines}.
"""
    print(body)
    if not args.no_docs:
        update_docs(Path(args.docs), "cpu-paths", body)
    if with_rewards != without_rewards or kernel_lines:
        raise SystemExit("the two CPU paths differ")


if __name__ == "__main__":
    main()
