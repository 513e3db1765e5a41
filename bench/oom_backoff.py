#!/usr/bin/env python
"""Show the out-of-memory back-off meeting a real limit: cap the memory below what the
configured chunk sizes need, train, and check that the run recovered without losing or
repeating a step.

    python -m bench.oom_backoff --device cuda --arch qwen2.5-1.5b     # GPU; ~2 minutes on an H100
    python -m bench.oom_backoff --arch qwen2.5-1.5b --tiny-shape \
        --prompt-length 16 --completion-length 32 --no-docs          # CPU dry run of the same code

The model is a random-weight model of a shipped architecture (bench.common, built once, reused
from --model-cache), with G=8, 2 prompts per step, prompt 256 + completion 1024 tokens (random
weights never stop early), and every phase in one chunk: generation of all 16 sequences at once,
a micro-batch of 16 and log-prob chunks of 1024 tokens. The memory is then capped a quarter of
the way from the planner's estimate for the smallest chunking to its estimate for that one (or at
--budget-gb), so the configured sizes cannot fit and the trainer has to back off for real. On a
GPU the cap is CUDA's own (`torch.cuda.set_per_process_memory_fraction`); on the CPU (dry run)
a dispatcher mode that counts live tensor bytes raises torch.OutOfMemoryError past the cap.

The run passes when every step ran exactly once (one metrics line per step, the optimizer's step
count equal to the number of steps), at least one out-of-memory error was caught and a chunk
size halved, and no step's peak memory went over the cap. The training runs in a child process
with what is left of --deadline; if it runs out of time, the steps it finished are reported.
The result is printed and written into docs/benchmarks.md between
`<!-- bench:DEVICE-oom-backoff -->` markers.

The mechanism itself is tested on the CPU with injected errors (tests/test_backoff.py); this
script is the same code meeting an allocator's limit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from bench import common
from bench.common import GIB, Settings
from lowvram_grpo.rundir import read_jsonl

REPORT_RESERVE_S = 10  # kept back from --deadline to write the report
# Everything in one chunk: what the cap makes impossible.
CONFIGURED = {"generation_chunk_size": 16, "micro_batch_size": 16, "logprob_chunk_size": 1024}


def demo_settings(args, work: Path) -> Settings:
    return common.random_arch_settings(
        args.device, args.arch, work, Path(args.model_cache), tiny_shape=args.tiny_shape,
        prompt_length=args.prompt_length, completion_length=args.completion_length,
        generation_chunk_size=CONFIGURED["generation_chunk_size"], micro_batch_size=CONFIGURED["micro_batch_size"],
        logprob_chunk_size=CONFIGURED["logprob_chunk_size"], warmup_steps=0, steps=args.steps)


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

    from lowvram_grpo.rundir import STATE_FILE, latest_checkpoint

    state = torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=False)
    counters = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    if len(counters) != 1:
        raise RuntimeError(f"LoRA parameters disagree on the optimizer step: {sorted(counters)}")
    return counters.pop()


def planner_estimates(settings: Settings) -> tuple[float, float]:
    """(smallest, configured) chunking: the planner's GB allocated by torch, without the CUDA
    context, which the allocator cap does not cover."""
    from lowvram_grpo.planning.chunking import Chunking
    from lowvram_grpo.planning.memory import estimate_memory

    arch = settings.planner_values()
    config = settings.train_config(Path(tempfile.gettempdir()))
    configured = estimate_memory(arch, config).allocated_bytes / GIB
    smallest = estimate_memory(arch, config, **Chunking.SMALLEST).allocated_bytes / GIB
    return smallest, configured


# --- the child: capped training ------------------------------------------------------------------


def child_main(settings_path: Path, cap_gb: float, run_dir: Path, steps_path: Path) -> None:
    """Train under the cap, writing each step's metrics line (its peak under the cap included)
    to `steps_path` as it finishes, so that the parent can report a run stopped half-way."""
    import contextlib

    import torch

    from lowvram_grpo.rundir import append_jsonl
    from lowvram_grpo.trainer import train

    settings = Settings.from_json(settings_path.read_text())
    cap_bytes = int(cap_gb * GIB)
    if settings.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
        cap = contextlib.nullcontext()  # the trainer's peak_memory_gb is the allocator's own figure

        def on_step(record):
            append_jsonl(steps_path, record)
    else:
        from bench.live_bytes import CappedTensorBytes

        torch.set_num_threads(1)
        cap = CappedTensorBytes(cap_bytes)

        def on_step(record):
            # The trainer's CPU figure is the process's peak RSS; under the stand-in cap, the
            # figure that matters is the peak of live tensor bytes during the step.
            append_jsonl(steps_path, {**record, "peak_memory_gb": cap.peak / GIB})
            cap.peak = cap.current

    # save_every = steps: one checkpoint at the end, whose optimizer state counts the updates.
    config = settings.train_config(run_dir, save_every=settings.total_steps)
    with cap:
        train(config, progress=False, on_step=on_step)
    (run_dir / "optimizer_steps.json").write_text(json.dumps(optimizer_step_count(run_dir)))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- the parent: estimates, cap, child, report -----------------------------------------------------


def report(settings: Settings, device: str, cap_gb: float, smallest_gb: float, configured_gb: float,
           records: list[dict], problems: list[str], command: str) -> str:
    how = ("`torch.cuda.set_per_process_memory_fraction`" if settings.device == "cuda"
           else "a dispatcher mode counting live tensor bytes (CPU stand-in for CUDA's limit)")
    lines = [
        f"## Out-of-memory back-off: {'CUDA' if settings.device == 'cuda' else 'CPU'}, {settings.model_label}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {device}, capped at {cap_gb:.3f} GB with {how}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in common.versions().items() if k != "trl"),
        f"- Settings: G={settings.num_generations}, {settings.prompts_per_step} prompts/step, prompt "
        f"{settings.max_prompt_length} + completion {settings.max_completion_length} tokens, 4-bit NF4, "
        f"{settings.dtype}, LoRA r={settings.lora_r} all-linear, beta={settings.beta}, {settings.loss_type}; "
        f"configured chunking: generation {CONFIGURED['generation_chunk_size']} sequences, micro-batch "
        f"{CONFIGURED['micro_batch_size']}, log-prob chunk {CONFIGURED['logprob_chunk_size']} tokens",
        f"- Planner (memory allocated by torch): smallest chunking {smallest_gb:.3f} GB, configured "
        f"chunking {configured_gb:.3f} GB",
        "",
        "| step | out-of-memory errors caught | generation chunk | micro-batch | log-prob chunk | "
        "peak allocated (GB) | step time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['oom_retries']} | {r['generation_chunk_size']} | {r['micro_batch_size']} | "
              f"{r['logprob_chunk_size']} | {r['peak_memory_gb']:.3f} | {r['step_time']:.1f} |" for r in records]
    lines += ["", "Result: " + ("every step ran once, the optimizer stepped once per step, and no step went "
                               "over the cap." if not problems else "FAILED: " + "; ".join(problems))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--arch", default="qwen2.5-1.5b", choices=common.shipped_architectures())
    parser.add_argument("--tiny-shape", action="store_true", help="the architecture's tiny stand-in (dry runs)")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, help="the cap (default: chosen from the planner's estimates)")
    common.add_suite_part_arguments(parser)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--cap-gb", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(Path(args.settings), args.cap_gb, Path(args.work_dir) / "run", Path(args.work_dir) / "steps.jsonl")
        return 0

    import shutil

    if args.device == "cuda" and not _cuda_available():
        print("error: --device cuda needs a CUDA GPU (the CPU dry run is --device cpu --tiny-shape; the "
              "mechanism's test is tests/test_backoff.py)", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="oom-backoff-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "run", ignore_errors=True)
    (work / "steps.jsonl").unlink(missing_ok=True)
    settings = demo_settings(args, work)
    (work / "settings.json").write_text(settings.to_json())
    smallest_gb, configured_gb = planner_estimates(settings)
    cap_gb = args.budget_gb or choose_cap_gb(smallest_gb, configured_gb)
    print(f"capping at {cap_gb:.3f} GB (planner: configured {configured_gb:.3f} GB, smallest {smallest_gb:.3f} GB)",
          flush=True)

    left = common.seconds_left(args.deadline)
    status = common.run_logged(
        [sys.executable, "-m", "bench.oom_backoff", "--child", "--settings", str(work / "settings.json"),
         "--cap-gb", repr(cap_gb), "--work-dir", str(work)], work / "train.log",
        None if left is None else left - REPORT_RESERVE_S)
    print(common.log_tail(work / "train.log", 15 if status == "ok" else 40))
    records = read_jsonl(work / "steps.jsonl")
    if status == "ok":
        optimizer_steps = json.loads((work / "run" / "optimizer_steps.json").read_text())
        problems = check_run(records, optimizer_steps, settings.total_steps, cap_gb)
    else:
        problems = [f"the run {status} after {len(records)} of {settings.total_steps} steps"]
        problems += [p for p in check_run(records, len(records), len(records), cap_gb) if "steps logged" not in p]
    text = report(settings, common.device_description(args.device), cap_gb, smallest_gb, configured_gb, records,
                  problems, common.command_line("bench.oom_backoff", argv))
    print(text)
    if not args.no_docs:
        key = f"{args.device}-oom-backoff"
        common.update_docs(Path(args.docs), key, text)
        print(f"\nwrote the {key} section of {args.docs}")
    (work / "result.json").write_text(json.dumps({"cap_gb": cap_gb, "records": records, "problems": problems},
                                                 indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
