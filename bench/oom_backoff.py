#!/usr/bin/env python
"""Show the out-of-memory back-off on a real GPU: cap torch's memory below what the configured
chunk sizes need, train, and check that the run recovered without losing or repeating a step.

    python bench/oom_backoff.py --arch qwen2.5-1.5b            # GPU only; ~2 minutes on an H100

The model is bench_grpo.py's random-weight model of a shipped architecture (built once, reused
from --model-cache), with G=8, 2 prompts per step, prompt 256 + completion 1024 tokens (random
weights never stop early), and every phase in one chunk: generation of all 16 sequences at once,
a micro-batch of 16 and log-prob chunks of 1024 tokens. `torch.cuda.set_per_process_memory_fraction`
then caps this process a quarter of the way from the planner's estimate for the smallest chunking
to its estimate for that one (or at --budget-gb), so the configured sizes cannot fit and the
trainer has to back off for real.

The run passes when every step ran exactly once (one metrics line per step, the optimizer's step
count equal to the number of steps), at least one out-of-memory error was caught and a chunk
size halved, and no step's peak allocated memory went over the cap. The result is printed and
written into docs/benchmarks.md between `<!-- bench:cuda-oom-backoff -->` markers.

The mechanism itself is tested on the CPU with injected errors (tests/test_backoff.py); this
script is the same code meeting CUDA's allocator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_grpo  # noqa: E402  (the random models, prompts, reward and docs writer)

GIB = 2**30
DOCS_KEY = "cuda-oom-backoff"


def demo_overrides(model_dir: Path, dataset: Path, output_dir: Path, steps: int) -> dict:
    """Our trainer's settings for the demonstration: everything in one chunk."""
    return {
        "model_name_or_path": str(model_dir), "quantization": "nf4", "dtype": "bfloat16",
        "dataset": str(dataset), "rewards": [{"name": f"{bench_grpo.__file__}:bench_reward", "weight": 1.0}],
        "num_generations": 8, "prompts_per_step": 2, "max_prompt_length": 256, "max_completion_length": 1024,
        "generation_chunk_size": 16, "micro_batch_size": 16, "logprob_chunk_size": 1024,
        "beta": 0.04, "loss_type": "dapo", "learning_rate": 1e-5, "lr_scheduler": "constant", "warmup_steps": 0,
        "max_steps": steps, "save_every": steps, "log_completions_every": 10**6, "output_dir": str(output_dir),
    }


def choose_cap_gb(smallest_gb: float, configured_gb: float) -> float:
    """A cap the configured chunking cannot fit under but the smallest comfortably can: a
    quarter of the way from one estimate to the other (the planner overestimates by 4-25%)."""
    if configured_gb <= smallest_gb:
        raise ValueError("the configured chunking is already the smallest: nothing to back off from")
    return smallest_gb + 0.25 * (configured_gb - smallest_gb)


def check_run(records: list[dict], optimizer_steps: int, steps: int, cap_gb: float) -> list[str]:
    """What went wrong with the demonstration run; empty when it shows the back-off working."""
    problems = []
    if [r["step"] for r in records] != list(range(1, steps + 1)):
        problems.append(f"steps logged {[r['step'] for r in records]}, expected 1..{steps} once each")
    if optimizer_steps != steps:
        problems.append(f"the optimizer stepped {optimizer_steps} times for {steps} training steps")
    if sum(r["oom_retries"] for r in records) == 0:
        problems.append("no out-of-memory error happened: lower --budget-gb")
    over = [r["step"] for r in records if r["peak_memory_gb"] > cap_gb]
    if over:
        problems.append(f"steps {over} peaked above the {cap_gb:.2f} GB cap")
    return problems


def optimizer_step_count(run_dir: Path) -> int:
    """AdamW's own step counter in the newest checkpoint: how many updates were applied."""
    import torch

    from lowvram_grpo.checkpoint import STATE_FILE, latest_checkpoint

    state = torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=False)
    counters = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    if len(counters) != 1:
        raise RuntimeError(f"LoRA parameters disagree on the optimizer step: {sorted(counters)}")
    return counters.pop()


def report(arch: str, cap_gb: float, smallest_gb: float, configured_gb: float, records: list[dict],
           problems: list[str], command: str) -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    lines = [
        f"## Out-of-memory back-off on CUDA: {arch} (random weights)",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {props.name}, {props.total_memory / GIB:.0f} GiB, capped at {cap_gb:.2f} GB with "
        "`torch.cuda.set_per_process_memory_fraction`",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in bench_grpo.versions().items()),
        f"- Settings: G=8, 2 prompts/step, prompt 256 + completion 1024 tokens, 4-bit NF4, bf16, LoRA r=16 "
        "all-linear, beta=0.04, dapo; configured chunking: generation 16 sequences, micro-batch 16, "
        "log-prob chunk 1024 tokens",
        f"- Planner (memory allocated by torch): smallest chunking {smallest_gb:.2f} GB, configured "
        f"chunking {configured_gb:.2f} GB",
        "",
        "| step | out-of-memory errors caught | generation chunk | micro-batch | log-prob chunk | "
        "peak allocated (GB) | step time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['oom_retries']} | {r['generation_chunk_size']} | {r['micro_batch_size']} | "
              f"{r['logprob_chunk_size']} | {r['peak_memory_gb']:.2f} | {r['step_time']:.1f} |" for r in records]
    lines += ["", "Result: " + ("every step ran once, the optimizer stepped once per step, and no step went "
                               "over the cap." if not problems else "FAILED: " + "; ".join(problems))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2.5-1.5b", choices=sorted(
        p.stem for p in (REPO_ROOT / "lowvram_grpo" / "arch").glob("*.json")))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, help="the cap (default: chosen from the planner's estimates)")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "lowvram_grpo_bench"))
    parser.add_argument("--docs", default=str(bench_grpo.DEFAULT_DOCS))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("error: this demonstration needs a CUDA GPU (the CPU test is tests/test_backoff.py)", file=sys.stderr)
        return 2
    from lowvram_grpo.config import load_config
    from lowvram_grpo.memory import estimate_memory, load_arch
    from lowvram_grpo.rundir import read_jsonl
    from lowvram_grpo.trainer import train

    work = Path(tempfile.mkdtemp(prefix="oom-backoff-"))
    model_dir = bench_grpo.build_random_model(args.arch, Path(args.model_cache) / args.arch)
    dataset = work / "prompts.jsonl"
    bench_grpo.write_jsonl(dataset, bench_grpo.random_prompts(num_rows=64, length=256, seed=0))
    config = load_config(overrides=demo_overrides(model_dir, dataset, work / "run", args.steps))

    # The planner's figures without the CUDA context, which the allocator cap does not cover.
    arch = load_arch(args.arch)
    configured_gb = estimate_memory(arch, config).allocated_bytes / GIB
    smallest_gb = estimate_memory(arch, config, generation_chunk_size=1, micro_batch_size=1,
                                  logprob_chunk_size=16).allocated_bytes / GIB
    cap_gb = args.budget_gb or choose_cap_gb(smallest_gb, configured_gb)
    total_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb / total_gb))
    print(f"capping torch at {cap_gb:.2f} GB of {total_gb:.0f} (planner: configured {configured_gb:.2f} GB, "
          f"smallest {smallest_gb:.2f} GB)", flush=True)

    train(config, progress=False)
    records = read_jsonl(work / "run" / "metrics.jsonl")
    problems = check_run(records, optimizer_step_count(work / "run"), args.steps, cap_gb)
    command = shlex.join(["python", "bench/oom_backoff.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(args.arch, cap_gb, smallest_gb, configured_gb, records, problems, command)
    print(text)
    if not args.no_docs:
        bench_grpo.update_docs(Path(args.docs), DOCS_KEY, text)
        print(f"\nwrote the {DOCS_KEY} section of {args.docs}")
    (work / "result.json").write_text(json.dumps({"records": records, "problems": problems}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
