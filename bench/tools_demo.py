#!/usr/bin/env python
"""The offline tools demo: does the reward climb *because of* tool use?

    python -m bench.tools_demo                     # CPU, tiny-cpu-tools preset, 2 seeds per arm (~5 min)
    python -m bench.tools_demo --seeds 1 --no-docs # a quick look

Two arms of the `tiny-cpu-tools` preset (60 steps of 8 two-digit sums x G=8), same seeds:
- with the calculator: the preset as it is;
- without it: the same command with `tools=[]` (no tool shown, none to call: single-turn).

Reported per arm, means over the seeds: the reward (exact answer) and the calls per trajectory
(`tools/call_frequency`) over the first and the last tenth of the steps, and both every tenth
of the run, so the two curves can be read side by side. The built-in tiny tools model is built
(and cached) on first use.

Results are printed and written into docs/benchmarks.md between `<!-- bench:cpu-tools-demo -->`
markers (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

from bench import common

DOCS_KEY = "cpu-tools-demo"
ARMS = {"with the calculator": {}, "tool removed (tools=[])": {"tools": []}}


def run_arm(overrides: dict, seed: int, steps: int, work_dir: Path) -> list[dict]:
    from lowvram_grpo.config import load_config
    from lowvram_grpo.trainer import train

    name = "no-tool" if overrides else "tool"
    config = load_config(preset="tiny-cpu-tools", overrides={
        "output_dir": str(work_dir / f"{name}-{seed}"), "max_steps": steps, "seed": seed, "save_every": steps,
        **overrides})
    records: list[dict] = []
    train(config, progress=False, on_step=records.append)
    return records


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(runs: list[list[dict]]) -> dict:
    """Means over seeds of each tenth of the run: reward and calls per trajectory."""
    steps = len(runs[0])
    tenth = max(steps // 10, 1)
    tenths = [range(start, min(start + tenth, steps)) for start in range(0, steps, tenth)]

    def series(key: str) -> list[float]:
        return [mean([run[i].get(key, 0.0) for run in runs for i in part]) for part in tenths]

    return {"reward": series("reward"), "calls": series("tools/call_frequency"),
            "step_time": mean([r["step_time"] for run in runs for r in run])}


def format_table(summaries: dict[str, dict]) -> str:
    lines = ["| arm | reward, first tenth -> last tenth | tool calls per trajectory, first -> last tenth | "
             "mean step time (s) |", "|---|---|---|---|"]
    for arm, s in summaries.items():
        lines.append(f"| {arm} | {s['reward'][0]:.3f} -> {s['reward'][-1]:.3f} | "
                     f"{s['calls'][0]:.3f} -> {s['calls'][-1]:.3f} | {s['step_time']:.2f} |")
    lines += ["", "Every tenth of the run (reward / calls per trajectory):", "",
              "| arm | " + " | ".join(f"{i + 1}/10" for i in range(len(next(iter(summaries.values()))["reward"])))
              + " |", "|---|" + "---|" * len(next(iter(summaries.values()))["reward"])]
    for arm, s in summaries.items():
        lines.append(f"| {arm} | " + " | ".join(f"{r:.2f} / {c:.2f}" for r, c in zip(s["reward"], s["calls"])) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60, the preset's)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per arm, seeds 42, 43, ... (default 2)")
    parser.add_argument("--docs", type=Path, default=common.DEFAULT_DOCS)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as the preset's cpu_threads
    summaries, load = {}, {}
    with tempfile.TemporaryDirectory(prefix="lowvram-tools-") as tmp:
        for arm, overrides in ARMS.items():
            load[arm] = os.getloadavg()[0]
            runs = [run_arm(overrides, 42 + i, args.steps, Path(tmp)) for i in range(args.seeds)]
            summaries[arm] = summarise(runs)
            print(f"{arm}: {summaries[arm]}", flush=True)
    table = format_table(summaries)
    print(table)
    if not args.no_docs:
        command = common.command_line("bench.tools_demo", argv)
        body = "\n".join([
            "## Tool use: the offline tools demo (`tiny-cpu-tools`), CPU",
            "",
            f"- Command: `{command}`",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Device: {common.device_description('cpu')}",
            "- Versions: " + ", ".join(f"{k} {val}" for k, val in common.versions().items()),
            f"- Settings: the tiny-cpu-tools preset ({args.steps} steps of 8 two-digit sums x G=8, the calculator "
            f"`lowvram_grpo.builtin.calculator.add`, max_tool_calling_iterations=1, reward arith_answer on the final answer); "
            f"{args.seeds} seed(s) per arm, figures are means over seeds; the second arm is the same command with "
            "`tools=[]`",
            "- Machine load average (1 min) when each arm started: "
            + ", ".join(f"{arm} {value:.2f}" for arm, value in load.items()),
            "",
            table,
            "",
            "The built-in tiny tools model cannot add two-digit numbers by itself; its warm-up showed it the "
            "calculator on every other problem. With the tool, GRPO raises the calls per trajectory and the reward "
            "with them; with the tool removed the same run has nothing to learn from.",
        ])
        common.update_docs(args.docs, DOCS_KEY, body)
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
