"""What rewards beyond rules cost: the code sandbox's time per program and per step, and the
memory the planner counts for a reward model.

    python -m bench.bench_rewards              # prints, and writes docs/benchmarks.md
    python -m bench.bench_rewards --no-docs    # prints only

Measured on this machine's CPUs (the sandbox does not use the GPU):
- one trivial program, start to cleanup (confinement, Python's start-up, reaping);
- a step of an MBPP-sized code task: 32 completions (4 prompts x G=8), 3 asserts each, with
  1 worker and with one worker per core;
- the planner's reward-model figures for Qwen2.5 0.5B and 1.5B architectures (4-bit, a batch of
  8 sequences of 256 + 512 tokens).
The section goes between `<!-- bench:rewards -->` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date

from bench import common
from lowvram_grpo.config import TrainConfig
from lowvram_grpo.planning.memory import reward_model_memory
from lowvram_grpo.rewards.code import CodeTests
from lowvram_grpo.rewards.sandbox import (
    SandboxLimits,
    default_workers,
    describe_isolation,
    isolation_report,
    run_program,
)

DOCS_KEY = "rewards"
COMMAND = "python -m bench.bench_rewards"
SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


def time_one(repeats: int) -> float:
    """Median seconds for one trivial program, start to cleanup."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run_program({"p.py": "print(1)"}, ["p.py"])
        assert result.returncode == 0, result.stderr
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_step(workers: int, completions: int = 32) -> float:
    reward = CodeTests(limits=SandboxLimits(), workers=workers)
    started = time.perf_counter()
    scores = reward(prompts=["p"] * completions, completions=[SOLUTION] * completions, tests=[TESTS] * completions)
    assert scores == [1.0] * completions
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    report = isolation_report()
    cores = default_workers()
    confined = time_one(args.repeats)
    one_worker = time_step(1)
    all_cores = time_step(cores)
    rows = [("one program, confined", f"{confined * 1000:.0f} ms"),
            ("32 completions x 3 asserts, 1 worker", f"{one_worker:.2f} s"),
            (f"32 completions x 3 asserts, {cores} workers (the cores)", f"{all_cores:.2f} s")]
    memory = []
    for arch in ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B"):
        config = TrainConfig(rewards=[f"model:{arch}"], max_prompt_length=256, max_completion_length=512)
        static, phase = reward_model_memory(config, dtype_bytes=2)
        memory.append((arch, sum(static.values()) / 2**30, sum(phase.values()) / 2**30))

    lines = [f"<!-- measured {date.today()} -->", "## Rewards beyond rules: code sandbox and reward-model memory", "",
             f"- Command: `{COMMAND}`", f"- Date: {date.today()}",
             f"- Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"running as {'root' if os.getuid() == 0 else 'a normal user'}, load average "
             f"{os.getloadavg()[0]:.1f} at the end (other work on the machine inflates the times)",
             f"- Sandbox here: {describe_isolation(report)}", "",
             "| code_tests | time |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows], "",
             "Each completion's asserts run in one program (harness + solution), so a step costs one sandboxed "
             "program per completion (one per pair for stdin/stdout tests).", "",
             "| reward model (planner, 4-bit, batch 8 x 896 tokens) | weights | forward of one batch |",
             "| --- | --- | --- |",
             *[f"| {arch} | {w:.2f} GB | {p:.2f} GB |" for arch, w, p in memory]]
    body = "\n".join(lines[1:])
    print(body)
    if not args.no_docs:
        common.update_docs(common.DEFAULT_DOCS, DOCS_KEY, body)
        print(f"\nwritten to {common.DEFAULT_DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
