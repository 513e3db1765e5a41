#!/usr/bin/env python
"""The longest completion that fits, before and after offloaded activations and sequence-chunked
layers (issue 25): planner numbers, no GPU needed.

    python -m bench.long_context            # prints the table, writes it into docs/benchmarks.md

For Qwen3-8B, Llama-3.1-8B and Qwen2.5-1.5B (their presets: G=8, prompt 256, 4-bit NF4 + LoRA
r=16, 8-bit paged AdamW where the preset says so) on 16, 24 and 80 GB cards: the longest
`max_completion_length` with which one sequence at a time fits (`planner.longest_completion`),
"before" with neither feature (the planner of the main branch, plus its new KV-cache-growth
term) and "after" with the settings `plan` would choose (offload_activations and
sequence_chunk_size auto), with what those need in CPU memory and what stops a longer one.
CPU memory is not the limit here (planned with 2 TB); the "CPU memory" column says what the
machine needs. The goals of issue 25 for Qwen3-8B: >= 32K on 16 GB, >= 64K on 24 GB, >= 256K on
80 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from bench import common

DOCS_KEY = "long-context-planner"
MODELS = (("qwen3-8b", "qwen3-8b-gsm8k"), ("llama-3.1-8b", "llama3.1-8b-gsm8k"), ("qwen2.5-1.5b", "qwen2.5-1.5b-gsm8k"))
CARDS_GB = (16, 24, 80)
GOALS = {("qwen3-8b", 16): 32768, ("qwen3-8b", 24): 65536, ("qwen3-8b", 80): 262144}
PLANNING_RAM_GB = 2048.0


def row(arch: str, preset: str, vram_gb: float) -> dict:
    from lowvram_grpo.config import load_config
    from lowvram_grpo.planning.memory import GIB
    from lowvram_grpo.planning.model_shape import load_arch
    from lowvram_grpo.planning.planner import longest_completion, plan

    model = load_arch(arch)
    config = load_config(preset=preset, overrides={"offload_activations": "auto", "sequence_chunk_size": "auto"})
    before = longest_completion(config, vram_gb, model, PLANNING_RAM_GB, candidates=[(False, None)])
    after = longest_completion(config, vram_gb, model, PLANNING_RAM_GB)
    at_after = plan(dataclasses.replace(config, max_completion_length=max(after, 1)), vram_gb, model_config=model,
                    ram_gb=PLANNING_RAM_GB)
    estimate = at_after.estimate
    phase = estimate.phases[estimate.peak_phase]
    largest = max(phase, key=phase.get)
    return {"arch": arch, "vram_gb": vram_gb, "before": before, "after": after,
            "offload": at_after.offload_activations, "chunk": at_after.sequence_chunk_size,
            "host_gb": estimate.host_bytes / GIB, "peak_phase": estimate.peak_phase, "largest": largest,
            "largest_gb": phase[largest] / GIB, "context": model.get("max_position_embeddings"),
            "goal": GOALS.get((arch, vram_gb))}


def format_table(rows: list[dict]) -> str:
    lines = ["| model | GPU | longest completion before | after | goal | settings after | CPU memory needed | "
             "what stops a longer one (peak phase: largest part) |",
             "|---|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        goal = "" if r["goal"] is None else f">= {r['goal'] // 1024}K: {'met' if r['after'] >= r['goal'] else 'NOT met'}"
        settings = f"offload={'on' if r['offload'] else 'off'}, chunk={r['chunk'] or 'off'}"
        lines.append(f"| {r['arch']} | {r['vram_gb']} GB | {r['before']:,} | {r['after']:,} | {goal} | {settings} | "
                     f"{r['host_gb']:.0f} GB | {r['peak_phase']}: {r['largest']} ({r['largest_gb']:.1f} GB) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default=str(common.DEFAULT_DOCS))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    rows = [row(arch, preset, gb) for arch, preset in MODELS for gb in CARDS_GB]
    table = format_table(rows)
    print(table)
    contexts = ", ".join(f"{r['arch']} {r['context']:,}" for r in rows[::len(CARDS_GB)])
    if not args.no_docs:
        body = "\n".join([
            "## Long completions: the longest that fits, before and after (planner)",
            "",
            f"- Command: `{common.command_line('bench.long_context', argv)}`",
            "- What: `planner.longest_completion` for each model's preset (G=8, prompt 256, 4-bit NF4 + LoRA), one "
            "sequence at a time (generation chunk 1, micro-batch 1, log-prob chunk 16); before = neither "
            "offloaded activations nor sequence-chunked layers, after = the settings `lowvram-grpo plan` chooses "
            "(offload_activations=auto, sequence_chunk_size=auto), with the CPU memory they need (planned with "
            f"{PLANNING_RAM_GB:.0f} GB of RAM, so that RAM is not what stops it). 10% of each card is kept free.",
            "- These are memory estimates: the per-token terms are checked against live tensor bytes on the CPU "
            "(tests/test_memory.py, within 5%); the GPU's numbers come from the long-context part of "
            "bench/gpu_suite.sh.",
            f"- The models' own position limits (max_position_embeddings) are not applied: {contexts}.",
            "",
            table,
        ])
        common.update_docs(Path(args.docs), DOCS_KEY, body)
        print(f"\nwrote the {DOCS_KEY} section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
