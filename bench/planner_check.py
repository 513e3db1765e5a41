#!/usr/bin/env python
"""Check the memory planner's formulas against the tensors a real training step keeps alive.

    python -m bench.planner_check                    # CPU, ~10 minutes: 6 architectures, 3 layers each

For each architecture (default Qwen2.5-0.5B, Llama-3.2-3B, Qwen2.5-7B, Qwen3-0.6B, Gemma-3-4B, LFM2-1.2B), a random-weight model
of the real config with its decoder cut to `--layers` layers (every term of the estimate is per
layer or per vocabulary entry, so a few layers exercise all of them: the full vocabulary,
hidden size, heads and MLP width), loaded the way training loads it (4-bit NF4 + LoRA), trains
two GRPO steps with G=8, prompt 32 + completion 16 tokens (random weights never stop early, so
every completion has the full length the planner assumes). A TorchDispatchMode counts the bytes
of every tensor storage alive, and the peak of each phase of the second step (the optimizer's
states exist from the first) is set against `lowvram_grpo.planning.memory.estimate_memory` for the same
settings, without the CUDA context (which no tensor holds) and, for the phases without gradients,
without the dequantised 4-bit weight that bitsandbytes 0.50 does not materialise there on the CPU.

This checks the formulas on the CPU, in float32 (bf16 matmuls on a CPU without bf16 units are
too slow to be useful). On a GPU, CUDA's caching allocator rounds and fragments on top of this,
and bitsandbytes' kernels keep their own buffers: `python -m bench.bench_grpo --device cuda` prints the
planner next to `torch.cuda.max_memory_allocated` for that. Results are written into
docs/benchmarks.md between `<!-- bench:cpu-planner -->` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from bench.live_bytes import LiveTensorBytes

GIB = 2**30
DOCS_KEY = "cpu-planner"
# Three of the 2026 architectures too: Qwen3 (q/k norms), Gemma 3 (262k vocabulary, sliding
# window, sandwich norms) and LFM2 (convolution layers; its first attention layer is layer 3).
DEFAULT_ARCHS = ("qwen2.5-0.5b", "llama-3.2-3b", "qwen2.5-7b", "qwen3-0.6b", "gemma-3-4b", "lfm2-1.2b")


def check_architecture(arch: str, layers: int, work: Path) -> dict:
    """Measured and estimated bytes for one architecture: static, and each phase's peak."""
    from lowvram_grpo import trainer
    from lowvram_grpo.data import load_prompt_data
    from lowvram_grpo.model import load_policy
    from lowvram_grpo.planning.chunking import GENERATION, LOGPROBS, PHASES, UPDATE
    from lowvram_grpo.planning.memory import CUDA_OVERHEAD_BYTES, DEQUANT_TERM, estimate_memory
    from lowvram_grpo.planning.planner import resolve_chunking
    from lowvram_grpo.rewards.loading import load_reward_functions
    from lowvram_grpo.sampling import PromptSampler

    model_dir = common.build_random_model(arch, work / f"{arch}-{layers}-layers", num_hidden_layers=layers)
    dataset = work / "prompts.jsonl"
    common.write_jsonl(dataset, common.random_prompts(num_rows=16, length=32, seed=0))
    settings = common.Settings(
        device="cpu", model_dir=str(model_dir), model_label=arch, dataset_path=str(dataset), reward="bench",
        num_generations=8, prompts_per_step=1, ours_generation_chunk_size=8, micro_batch_size=4,
        logprob_chunk_size=64, max_prompt_length=32, max_completion_length=16, warmup_steps=0, steps=2, arch=arch)
    config = settings.train_config(work / "unused")
    estimate = estimate_memory(common.arch_values(arch, num_hidden_layers=layers), config)
    device = torch.device("cpu")

    tracker = LiveTensorBytes()
    phase_peaks: dict[str, int] = {}
    measuring = False

    @contextlib.contextmanager
    def measure(phase: str):
        """The trainer's phase hook: the peak of live tensors within each phase of step 2."""
        tracker.peak = tracker.current
        yield
        if measuring:
            phase_peaks[phase] = max(phase_peaks.get(phase, 0), tracker.peak)

    with tracker:
        policy, tokenizer = load_policy(config, device)
        loaded = tracker.current
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = trainer.build_optimizer(config, params, device)
        learner = trainer.Learner(config, resolve_chunking(config, device), policy, tokenizer, optimizer,
                                  trainer.build_scheduler(config, optimizer), None, device,
                                  load_reward_functions(config.rewards), on_phase=measure)
        rows = load_prompt_data(config, tokenizer).train
        sampler = PromptSampler(len(rows), seed=0)
        trainer.grpo_step(learner, rows, sampler, step=1)  # the optimizer's states exist from here on
        before_step = tracker.current  # weights, LoRA, optimizer states, the data
        measuring = True
        record, _ = trainer.grpo_step(learner, rows, sampler, step=2)
    if record["completions/mean_length"] < config.max_completion_length:
        print(f"note: {arch}: mean completion length {record['completions/mean_length']:.1f} < "
              f"{config.max_completion_length} (an EOS was sampled)", file=sys.stderr)

    static = estimate.static_bytes - CUDA_OVERHEAD_BYTES

    def measurable(phase: str) -> int:
        # bitsandbytes 0.50 runs a matmul without gradients through its gemm_4bit op, which on the
        # CPU never holds a whole dequantised weight; with gradients (the update) it dequantises
        # the whole weight on every device. The planner counts a whole weight in every phase, as
        # older bitsandbytes did on a GPU (a GPU measurement settles it); here the phases without
        # gradients are compared without that term.
        without_gradients = phase in (GENERATION, LOGPROBS)
        return estimate.phase_bytes(phase) - (estimate.phases[phase].get(DEQUANT_TERM, 0) if without_gradients else 0)

    phases = {GENERATION: measurable(GENERATION), LOGPROBS: measurable(LOGPROBS),
              UPDATE: max(measurable(f"{UPDATE}: LM head"), measurable(f"{UPDATE}: layers"))}
    assert tuple(phases) == PHASES
    return {
        "arch": arch, "layers": layers,
        "loaded": {"measured": loaded, "estimated": static - estimate.optimizer_bytes},
        "static": {"measured": before_step, "estimated": static},
        "phases": {phase: {"measured": phase_peaks[phase], "estimated": static + phases[phase]} for phase in phases},
        # What each phase adds on top of the static memory: the part the chunk sizes control.
        "transient": {phase: {"measured": phase_peaks[phase] - before_step, "estimated": phases[phase]}
                      for phase in phases},
    }


def error(measured: int, estimated: int) -> str:
    return f"{100 * (estimated - measured) / measured:+.0f}%"


def format_results(results: list[dict]) -> str:
    """Two tables: totals (static + each phase's peak), then what each phase adds on its own."""
    def cell(part: dict) -> str:
        return (f"{part['measured'] / 2**20:.0f} / {part['estimated'] / 2**20:.0f} MiB "
                f"({error(part['measured'], part['estimated'])})")

    from lowvram_grpo.planning.chunking import PHASES as phases
    totals = ["architecture (layers)", "weights + LoRA, loaded", "+ optimizer states", "generation peak",
              "reference log-probs peak", "update peak"]
    added = ["architecture (layers)", "generation adds", "reference log-probs add", "update adds"]
    lines = ["| " + " | ".join(totals) + " |", "|" + "|".join("---" for _ in totals) + "|"]
    lines += ["| " + " | ".join([f"{r['arch']} ({r['layers']})", cell(r["loaded"]), cell(r["static"]),
                                 *(cell(r["phases"][p]) for p in phases)]) + " |" for r in results]
    lines += ["", "| " + " | ".join(added) + " |", "|" + "|".join("---" for _ in added) + "|"]
    lines += ["| " + " | ".join([f"{r['arch']} ({r['layers']})", *(cell(r["transient"][p]) for p in phases)]) + " |"
              for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lowvram_grpo_planner_check"))
    parser.add_argument("--docs", default=str(common.DEFAULT_DOCS))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for arch in args.arch:
        started = time.perf_counter()
        results.append(check_architecture(arch, args.layers, work))
        print(f"{arch}: {time.perf_counter() - started:.0f} s", flush=True)
    table = format_results(results)
    print(table)
    if not args.no_docs:
        command = common.command_line("bench.planner_check", argv)
        versions = ", ".join(f"{k} {v}" for k, v in common.versions().items() if k != "trl")
        body = "\n".join([
            "## Memory planner vs live tensors: CPU",
            "",
            f"- Command: `{command}`",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Device: {common.device_description('cpu')}",
            f"- Versions: {versions}",
            "- Settings: each architecture's real config (full vocabulary, hidden size, heads, MLP) with "
            f"{args.layers} decoder layers, random weights, 4-bit NF4 + LoRA r=16 all-linear, float32 compute, "
            "G=8, 1 prompt/step, prompt 32 + completion 16 tokens (no completion stopped early), generation "
            "chunk 8, micro-batch 4, log-prob chunk 64, beta=0.04, AdamW, gradient checkpointing on",
            "",
            "Each cell: measured / estimated (error of the estimate). Measured = the peak bytes of tensor "
            "storages alive during that phase of the second step (a TorchDispatchMode counts every storage "
            "created; the optimizer's states exist from the first step); estimated = "
            "`lowvram_grpo.planning.memory.estimate_memory` for the same settings without the CUDA context and, in "
            "generation and reference log-probs, without the whole dequantised 4-bit weight (bitsandbytes 0.50 "
            "runs matmuls without gradients through its gemm_4bit op, which on the CPU never holds one; with "
            "gradients it dequantises the whole weight on every device; whether its CUDA kernel holds one is for "
            "the GPU benchmark to show). The second "
            "table is each phase's peak minus the memory held before the step: the part that the chunk sizes "
            "control, and the part a wrong formula would show in.",
            "",
            table,
            "",
            "Positive errors are overestimates (the planner's side of safe). This checks the formulas, not "
            "the GPU: CUDA's caching allocator and bitsandbytes' kernels add their own memory on top, which "
            "`python -m bench.bench_grpo --device cuda` measures.",
        ])
        common.update_docs(Path(args.docs), DOCS_KEY, body)
        print(f"\nwrote the {DOCS_KEY} section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
