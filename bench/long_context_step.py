#!/usr/bin/env python
"""Peak memory and time of one long update, with and without offloaded activations (issue 25).

    python -m bench.long_context_step --device cuda --tokens 16384     # part of bash bench/gpu_suite.sh
    python -m bench.long_context_step --device cpu --tiny-shape --tokens 512 --chunk 128   # its dry run

One random-weight model of a shipped architecture (default the Qwen2.5-1.5B shape, which the
suite's other parts have already built), loaded as training loads it (4-bit NF4 + LoRA,
gradient checkpointing), runs the trainer's own update (`update._accumulate_gradients`: log-probs
with gradients, GRPO loss, backward) on one sequence of `--tokens` tokens, three times: as it is,
with offload_activations, then with sequence_chunk_size too (each switched on in turn on the same
policy). Generation is left out: decoding 16K tokens would take minutes; its KV cache is the
planner's to report. For each: the update's peak GPU memory (torch.cuda.max_memory_allocated
over what was allocated before it; on the CPU the live tensor bytes, offloaded ones apart), its
wall time (one untimed warm-up update first), the offloaded bytes, and the planner's estimate of
the same update. Written into docs/benchmarks.md between `<!-- bench:DEVICE-long-context -->`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

from bench import common

GIB = 2**30
DOCS_KEY = "long-context"


def measure(learner, prompt: int, completion: int, device: torch.device) -> dict:
    """One warm-up and one measured update of one random sequence; bytes and seconds."""
    from bench.live_bytes import LiveTensorBytes
    from lowvram_grpo.offload import offloader_of
    from lowvram_grpo.rollout import Rollout
    from lowvram_grpo.update import _accumulate_gradients

    generator = torch.Generator().manual_seed(0)
    vocab = learner.policy.config.vocab_size
    rollout = Rollout(prompt_ids=torch.randint(3, vocab, (1, prompt), generator=generator),
                      prompt_mask=torch.ones(1, prompt, dtype=torch.long),
                      completion_ids=torch.randint(3, vocab, (1, completion), generator=generator),
                      completion_mask=torch.ones(1, completion, dtype=torch.long), completions=[""],
                      is_clipped=torch.tensor([True]), num_prompts_truncated=0)
    ref_logps = torch.zeros(1, completion, device=device)
    offloader = offloader_of(learner.policy)

    def update() -> None:
        _accumulate_gradients(learner, rollout, torch.ones(1, device=device), ref_logps, None, 1,
                              float(completion), learner.chunking)
        if offloader:
            offloader.synchronize()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    update()  # warm-up: kernels, the allocator's blocks, the LoRA gradients
    if offloader:
        offloader.reset_peak()
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        update()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        tracker = LiveTensorBytes(offloaded=lambda: offloader.host_bytes if offloader else 0)
        with tracker:
            before = tracker.current - (offloader.host_bytes if offloader else 0)
            tracker.reset_peaks()
            started = time.perf_counter()
            update()
            seconds = time.perf_counter() - started
        peak = tracker.device_peak - before
    return {"peak_bytes": peak, "seconds": seconds, "offloaded_bytes": offloader.peak_host_bytes if offloader else 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--arch", default="qwen2.5-1.5b")
    parser.add_argument("--tiny-shape", action="store_true", help="the architecture's tiny stand-in (dry run)")
    parser.add_argument("--tokens", type=int, default=16384, help="prompt + completion of the one sequence")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=2048, help="sequence_chunk_size of the third run")
    parser.add_argument("--model-cache", default=str(Path("/tmp/lowvram_grpo_bench")))
    parser.add_argument("--work-dir", default=None, help="unused: the suite passes one to every part")
    parser.add_argument("--deadline", type=float, default=None, help="time.time() to finish by (checked between runs)")
    parser.add_argument("--docs", default=str(common.DEFAULT_DOCS))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (use --device cpu for the dry run)")
    from bench.update_bytes import load_learner
    from lowvram_grpo.config import TrainConfig
    from lowvram_grpo.model import enable_long_context
    from lowvram_grpo.planning.memory import estimate_memory

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    label = f"{args.arch}{'-tiny' if args.tiny_shape else ''}"
    model_dir = common.build_random_model(args.arch, Path(args.model_cache) / label, tiny=args.tiny_shape)
    completion = args.tokens - args.prompt_length
    config = TrainConfig(model_name_or_path=str(model_dir), max_prompt_length=args.prompt_length,
                         max_completion_length=completion, micro_batch_size=1, prompts_per_step=1, num_generations=2,
                         logprob_chunk_size=256, lora_dropout=0.0, offload_activations=False, sequence_chunk_size=None,
                         dtype="float32" if device.type == "cpu" else "auto")
    learner = load_learner(config, device)
    values = common.arch_values(args.arch, args.tiny_shape)
    runs = []
    for name, offload, chunk in (("as it is", False, None), ("offload_activations", True, None),
                                 (f"offload_activations + sequence_chunk_size={args.chunk}", True, args.chunk)):
        if args.deadline and time.time() > args.deadline:
            print(f"deadline reached before '{name}'", flush=True)
            break
        enable_long_context(learner.policy, offload and not any(r["offload"] for r in runs),
                            chunk if chunk else None)
        result = measure(learner, args.prompt_length, completion, device)
        estimate = estimate_memory(values, dataclasses.replace(config, dtype="bfloat16" if device.type == "cuda"
                                                               else "float32"), generation_chunk_size=1,
                                   offload_activations=offload, sequence_chunk_size=chunk)
        # The LoRA gradients were there before the update (from the warm-up): not part of its peak.
        planned = max(estimate.phase_bytes(p) - estimate.phases[p]["LoRA gradients (fp32)"]
                      for p in estimate.phases if p.startswith("update"))
        runs.append({"name": name, "offload": offload, **result, "planned_bytes": planned})
        print(f"{name}: peak {result['peak_bytes'] / GIB:.2f} GB (planner {planned / GIB:.2f}), "
              f"{result['seconds']:.2f} s, offloaded {result['offloaded_bytes'] / GIB:.2f} GB", flush=True)
    unit, scale = ("GB", GIB) if device.type == "cuda" else ("MB", 2**20)
    lines = [f"| update of one {args.tokens}-token sequence | peak memory ({unit}) | planner ({unit}) | "
             f"offloaded to CPU ({unit}) | time (s) | time vs as it is |", "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['peak_bytes'] / scale:.2f} | {r['planned_bytes'] / scale:.2f} | "
                     f"{r['offloaded_bytes'] / scale:.2f} | {r['seconds']:.2f} | "
                     f"{r['seconds'] / runs[0]['seconds']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.no_docs:
        versions = ", ".join(f"{k} {v}" for k, v in common.versions().items() if k != "trl")
        body = "\n".join([
            f"## Long sequences: one update with and without offloaded activations ({args.device.upper()})",
            "",
            f"- Command: `{common.command_line('bench.long_context_step', argv)}`",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Device: {common.device_description(args.device)}",
            f"- Versions: {versions}",
            f"- Settings: {label} (random weights), 4-bit NF4 + LoRA r=16 all-linear, gradient checkpointing, one "
            f"sequence of {args.prompt_length} + {completion} tokens, log-prob chunk 256, beta=0.04; the trainer's "
            "update (log-probs with gradients, loss, backward) after one warm-up update; no generation",
            "",
            "Peak memory: what the update allocated on top of what was there before it (weights, LoRA, "
            "gradients); planner: `estimate_memory`'s update phase for the same settings, without the LoRA "
            "gradients that were already there. Each row switches one more setting on for the same policy.",
            "",
            table,
        ])
        common.update_docs(Path(args.docs), f"{args.device}-{DOCS_KEY}", body)
        print(f"\nwrote the {args.device}-{DOCS_KEY} section of {args.docs}")
    return 0 if len(runs) == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
