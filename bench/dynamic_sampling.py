#!/usr/bin/env python
"""Dynamic sampling on the offline demo: zero_std_groups keep vs skip vs resample.

    python -m bench.dynamic_sampling                # CPU, tiny-cpu preset, 2 seeds per mode (~2 min)
    python -m bench.dynamic_sampling --steps 10 --seeds 1 --no-docs    # a quick look

Each mode trains the `tiny-cpu` preset (20 of its 60 steps of 8 prompts x G=8 by default: the
greedy eval reward nears 1 soon after) from the same seed, then the adapter is evaluated
greedily on the same held-out prompts (eval_fraction 0.1, 100 prompts). The base model's eval reward is measured once, before training, with the same
prompts. Reported per mode, summed or averaged over the seeds:
- generated tokens: every completion token sampled, extra resampling rounds included;
- training time: the sum of the steps' wall time (generation, rewards, log-probs, update);
- eval reward gain: final eval reward minus the base model's;
- reward per generated token: the gain per 1,000 generated tokens, and per second of training;
- skipped: the fraction of completion tokens left out of the log-prob and backward passes.

Results are printed and written into docs/benchmarks.md between `<!-- bench:cpu-dynamic-sampling -->`
markers (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import common

MODES = ("keep", "skip", "resample")
DOCS_KEY = "cpu-dynamic-sampling"


def base_eval_reward(config) -> float:
    """Greedy eval reward of the untrained adapter (LoRA B = 0, so the base model)."""
    import torch

    from lowvram_grpo.data import load_prompt_data
    from lowvram_grpo.evaluate import evaluate
    from lowvram_grpo.model import load_policy
    from lowvram_grpo.rewards.base import RewardContext
    from lowvram_grpo.rewards.loading import load_reward_functions
    from lowvram_grpo.trainer import seed_everything

    seed_everything(config.seed)
    policy, tokenizer = load_policy(config, torch.device("cpu"))
    data = load_prompt_data(config, tokenizer)
    rewards = load_reward_functions(config.rewards, RewardContext(config, policy, tokenizer))
    return evaluate(policy, tokenizer, data.eval, rewards, config)["eval/reward"]


def run_mode(mode: str, seed: int, steps: int, work_dir: Path) -> dict:
    from lowvram_grpo.config import load_config
    from lowvram_grpo.trainer import train

    config = load_config(preset="tiny-cpu", overrides={
        "output_dir": str(work_dir / f"{mode}-{seed}"), "max_steps": steps, "seed": seed, "zero_std_groups": mode,
        "eval_fraction": 0.1, "eval_every": steps, "save_every": steps})
    records: list[dict] = []
    started = time.perf_counter()
    train(config, progress=False, on_step=records.append)
    sequences = config.sequences_per_step
    generated = sum(r.get("dynamic_sampling/generated_tokens", r["completions/mean_length"] * sequences)
                    for r in records)
    trained_tokens = sum(r["completions/mean_length"] * sequences for r in records)
    skipped = sum(r.get("dynamic_sampling/skipped_token_fraction", 0.0) * r["completions/mean_length"] * sequences
                  for r in records)
    return {"base": base_eval_reward(config), "final": records[-1]["eval/reward"],
            "generated_tokens": generated, "train_time": sum(r["step_time"] for r in records),
            "wall_time": time.perf_counter() - started, "skipped_fraction": skipped / trained_tokens,
            "resample_rounds": sum(r.get("dynamic_sampling/resample_rounds", 0) for r in records),
            "frac_zero_std": sum(r["frac_reward_zero_std"] for r in records) / len(records)}


def summarise(runs: list[dict]) -> dict:
    n = len(runs)
    mean = {key: sum(r[key] for r in runs) / n for key in runs[0]}
    gain = mean["final"] - mean["base"]
    mean.update(gain=gain, gain_per_1k_tokens=1000 * gain / mean["generated_tokens"],
                gain_per_second=gain / mean["train_time"])
    return mean


def format_table(summaries: dict[str, dict]) -> str:
    lines = ["| zero_std_groups | eval reward (base -> final) | generated tokens | training time (s) | "
             "reward gain per 1k generated tokens | reward gain per second | tokens skipped in update | "
             "resample rounds (all steps) | frac_reward_zero_std (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in summaries.items():
        lines.append(f"| {mode} | {s['base']:.3f} -> {s['final']:.3f} | {s['generated_tokens']:.0f} | "
                     f"{s['train_time']:.1f} | {s['gain_per_1k_tokens']:.4f} | {s['gain_per_second']:.4f} | "
                     f"{100 * s['skipped_fraction']:.0f}% | {s['resample_rounds']:.1f} | {s['frac_zero_std']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="training steps per run (default 20: the demo saturates soon after)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per mode, seeds 42, 43, ... (default 2)")
    parser.add_argument("--docs", type=Path, default=common.DEFAULT_DOCS)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as the preset's cpu_threads: tiny matrices run faster on one thread
    summaries, load = {}, {}
    with tempfile.TemporaryDirectory(prefix="lowvram-dynamic-") as tmp:
        for mode in MODES:
            load[mode] = os.getloadavg()[0]  # times on a shared machine are only as good as its load
            runs = [run_mode(mode, 42 + i, args.steps, Path(tmp)) for i in range(args.seeds)]
            summaries[mode] = summarise(runs)
            print(f"{mode}: {summaries[mode]}", flush=True)
    table = format_table(summaries)
    print(table)
    if not args.no_docs:
        command = common.command_line("bench.dynamic_sampling", argv)
        v = common.versions()
        body = "\n".join([
            "## Dynamic sampling (zero_std_groups): CPU, tiny-cpu demo",
            "",
            f"- Command: `{command}`",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Device: {common.device_description('cpu')}",
            "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- Settings: the tiny-cpu preset ({args.steps} steps of 8 prompts x G=8, beta=0.04, loss_type=dapo, "
            f"max_resample_rounds=3), {args.seeds} seed(s) per mode (figures are means over seeds); eval reward is "
            "greedy, on the same 100 held-out prompts (eval_fraction 0.1)",
            "- Machine load average (1 min) when each mode started: "
            + ", ".join(f"{mode} {value:.2f}" for mode, value in load.items()),
            "",
            table,
            "",
            "Reward gain = final eval reward minus the base model's; per 1k generated tokens counts every sampled "
            "token, resampling rounds included; training time is the sum of step times (generation, rewards, "
            "log-probs, update), without model loading and evaluation.",
        ])
        common.update_docs(args.docs, DOCS_KEY, body)
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
