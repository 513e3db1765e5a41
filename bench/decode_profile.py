#!/usr/bin/env python
"""Where the time of one generated token goes, beside the physical limit.

    python -m bench.decode_profile --device cuda --arch qwen2.5-1.5b --tokens 16   # GPU, ~1 minute
    python -m bench.decode_profile --arch qwen2.5-1.5b --tiny-shape \
        --prompt-length 16 --tokens 4 --no-docs                           # CPU dry run of the same code

Generation is most of a GRPO step (every completion token is one forward pass of the whole
model), so this is the profile to read before speeding anything up. The policy is loaded as the
trainer loads it (random weights of a shipped architecture, 4-bit NF4 + LoRA r=16 all-linear,
adapter on) and `generate` runs with the trainer's sampling settings (rollout.py) for chunks of
8 and 32 sequences after prompts of --prompt-length tokens. For each chunk size:

- time per generated token without the profiler: a decode step's wall time over the chunk's
  sequences, for --tokens decode steps after the prefill and one more step (and after a whole
  warm-up `generate` of the same length);
- the same steps under torch.profiler, their time split into 4-bit matmuls (bitsandbytes'
  dequantisation and matmul: everything inside the base layers of the LoRA layers), LoRA
  (lora_A, lora_B), attention (`scaled_dot_product_attention`), the LM head, other device
  work (norms, rotary embeddings, activations, sampling, copies) and Python/launch overhead:
  the step's wall time minus the time the device was busy. On a GPU "busy" is the sum of the
  kernels' durations; on the CPU (dry run) it is the time inside top-level torch operators.
  The profiler and the labels slow the CPU side, so these add up to the profiled step, not the
  plain one;
- the bandwidth floor: the bytes a decode step must read (every weight once: packed 4-bit
  weights with their scales, LoRA, norms, the LM head; of the input embedding only a few rows,
  left out) divided
  by the memory bandwidth (the GPU's specification where known, else a measured copy), per
  generated token. The KV cache read per step is shown beside it.

measured / floor says how far generation is from its physical limit; the categories say what
to speed up first. Results go to --work-dir (JSON per chunk size, the profiler's operator
table) and to docs/benchmarks.md between `<!-- bench:DEVICE-decode-profile -->` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import common

# Labels put on the profiler's timeline around the modules of each category.
FOUR_BIT, LORA, LM_HEAD, ATTENTION = "4-bit matmuls", "LoRA", "LM head", "attention"
OTHER, OVERHEAD = "other device work", "Python/launch overhead"
CATEGORIES = (FOUR_BIT, LORA, ATTENTION, LM_HEAD, OTHER, OVERHEAD)
LABEL_PREFIX = "bench::"
# torch's attention operator and the backend operators it calls (flash, memory-efficient, math).
ATTENTION_OP = "scaled_dot_product"

# Memory bandwidth from the makers' specifications (bytes/s), by a part of the device name; the
# first match counts, so a more specific name comes before a shorter one it contains.
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


# --- the floor -----------------------------------------------------------------------------------


def weight_bytes_per_step(policy) -> int:
    """Bytes of weights one decode step reads: every parameter (4-bit weights as stored, with
    their quantisation scales), except the input embedding, of which only a few rows are read
    (unless it is tied to the LM head, which reads all of it)."""
    total = 0
    for p in policy.parameters():  # shared (tied) parameters come once
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.nbytes + state.code.nbytes
            if state.nested:
                total += state.state2.absmax.nbytes + state.state2.code.nbytes
    embedding = policy.get_input_embeddings().weight
    if embedding is not policy.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


def kv_cache_bytes_per_step(model_config, sequences: int, context: float, element_size: int) -> float:
    """Bytes of keys and values one decode step reads at `context` tokens per sequence."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim * context * sequences \
        * element_size


def memory_bandwidth(device) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): the specification for known GPUs, else a copy
    measured here (what a bandwidth-bound kernel can reach, a little under the specification)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, value in SPEC_BANDWIDTH.items():
            if part in name:
                return value, f"{name} specification"
    measured = measure_copy_bandwidth(device)
    return measured, "measured copy"


def measure_copy_bandwidth(device) -> float:
    import torch

    numel = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best  # read once, written once


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- labelling and categorising ------------------------------------------------------------------


@contextlib.contextmanager
def labelled(policy):
    """Put each module of a category inside a `record_function` range named after it."""
    import bitsandbytes as bnb
    import torch

    head = policy.get_output_embeddings()
    wrapped = []

    def wrap(module, label):
        original = module.forward

        def forward(*args, **kwargs):
            with torch.profiler.record_function(LABEL_PREFIX + label):
                return original(*args, **kwargs)

        module.forward = forward
        wrapped.append(module)

    for name, module in policy.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            wrap(module, FOUR_BIT)
        elif name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"]):
            wrap(module, LORA)
        elif module is head:
            wrap(module, LM_HEAD)
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward  # the class's forward again


def category_of(event) -> str:
    """The innermost category range (or attention operator) around a profiler event."""
    while event is not None:
        if event.name.startswith("aten::") and ATTENTION_OP in event.name:
            return ATTENTION
        if event.name.startswith(LABEL_PREFIX):
            return event.name[len(LABEL_PREFIX):]
        event = event.cpu_parent
    return OTHER


def _is_op(event) -> bool:
    from torch.autograd import DeviceType

    return (event.device_type == DeviceType.CPU and not event.is_user_annotation
            and not event.name.startswith(LABEL_PREFIX) and not event.name.startswith("ProfilerStep"))


def categorise(events, on_gpu: bool) -> dict:
    """Split profiled decode steps into CATEGORIES (microseconds, summed over the steps).

    The steps are the profiler's "ProfilerStep#N" ranges. Device time: on a GPU each kernel's
    duration goes to the category around the operator that launched it, and "busy" is the sum over
    every kernel and copy on the device; on the CPU a top-level operator's time goes to its
    category, and "busy" is their sum. Overhead is wall time minus busy time.
    """
    from torch.autograd import DeviceType

    # The profiler mirrors each record_function range on the GPU's timeline as an annotation
    # with the same name: those are neither steps nor device work.
    steps = [e for e in events if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU]
    wall = sum(e.time_range.elapsed_us() for e in steps)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    if on_gpu:
        busy = sum(e.time_range.elapsed_us() for e in events
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
        for e in events:
            # The profiler hangs each kernel on the innermost CPU range active at its launch:
            # usually an operator, but a library calling CUDA outside any operator leaves it on
            # the enclosing record_function range, which names the category just as well.
            if e.device_type == DeviceType.CPU and e.kernels:
                totals[category_of(e)] += sum(k.duration for k in e.kernels)
        # Kernels and copies no operator claims (e.g. synchronising copies) are other work.
        totals[OTHER] = max(busy - sum(totals[c] for c in (FOUR_BIT, LORA, ATTENTION, LM_HEAD)), 0.0)
    else:
        busy = 0.0
        for e in events:
            if _is_op(e) and not _has_op_ancestor(e):
                duration = e.time_range.elapsed_us()
                totals[category_of(e)] += duration
                busy += duration
    totals[OVERHEAD] = max(wall - busy, 0.0)
    return {"steps": len(steps), "wall_us": wall, "busy_us": busy, "categories_us": totals}


def _has_op_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_op(parent):
            return True
        parent = parent.cpu_parent
    return False


# --- the child: load once, profile each chunk size ----------------------------------------------


def profile_chunk(policy, tokenizer, device, chunk: int, prompt_length: int, tokens: int, out_dir: Path) -> dict:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Tick(StoppingCriteria):
        """Called by generate() once per generated token: marks the step boundaries."""

        def __init__(self, on_tick):
            self.on_tick = on_tick

        def __call__(self, input_ids, scores, **kwargs):
            self.on_tick()
            return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)

    prompts = [row["prompt"] for row in common.random_prompts(chunk, prompt_length, seed=chunk)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    assert batch["input_ids"].size(1) == prompt_length

    def generate(new_tokens: int, on_tick):
        # rollout.generate_rollouts' call, with a per-token tick added.
        policy.generate(**batch, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                        use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id],
                        stopping_criteria=StoppingCriteriaList([Tick(on_tick)]))

    # 1. Without the profiler: step 1 is the prefill, step 2 a warm-up; then `tokens` steps.
    marks = []

    def mark():
        _sync(device)
        marks.append(time.perf_counter())

    generate(tokens + 2, lambda: None)  # warm-up of every kernel for this batch shape
    generate(tokens + 2, mark)
    step_s = (marks[-1] - marks[1]) / tokens

    # 2. The same steps under the profiler (prefill and the warm-up step outside its window).
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with labelled(policy), torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=1, warmup=1, active=tokens)) as prof:
        generate(tokens + 2, prof.step)
    events = prof.events()
    split = categorise(events, on_gpu=device.type == "cuda")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out_dir / f"ops-chunk{chunk}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    return {"chunk": chunk, "prompt_length": prompt_length, "decode_steps": tokens,
            "step_s": step_s, "token_s": step_s / chunk, **split}


def child_main(args) -> None:
    import torch

    from lowvram_grpo.model import load_policy

    device = torch.device(args.device)
    work = Path(args.work_dir)
    settings = common.random_arch_settings(args.device, args.arch, work, Path(args.model_cache),
                                           tiny_shape=args.tiny_shape, prompt_length=args.prompt_length)
    if args.device == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    policy, tokenizer = load_policy(settings.train_config(work / "unused"), device)
    policy.eval()  # as rollout.generate_rollouts generates: no dropout, no gradient checkpointing
    print(f"policy loaded in {time.perf_counter() - started:.0f} s", flush=True)
    bandwidth, source = memory_bandwidth(device)
    floor = {"weight_bytes": weight_bytes_per_step(policy), "bandwidth": bandwidth, "bandwidth_source": source,
             "device": common.device_description(args.device), "model_label": settings.model_label}
    (work / "floor.json").write_text(json.dumps(floor, indent=1))
    element_size = policy.get_output_embeddings().weight.element_size()
    for chunk in args.chunks:
        result = profile_chunk(policy, tokenizer, device, chunk, args.prompt_length, args.tokens, work)
        # Mean context over the profiled steps: the prompt, two earlier tokens, half the window.
        context = args.prompt_length + 2 + args.tokens / 2
        result["kv_bytes"] = kv_cache_bytes_per_step(policy.config, chunk, context, element_size)
        (work / f"chunk{chunk}.json").write_text(json.dumps(result, indent=1))
        print(f"chunk {chunk}: {1e3 * result['token_s']:.3f} ms per generated token", flush=True)


# --- the parent: run the child, report what it left ----------------------------------------------


def format_report(floor: dict, results: list[dict]) -> str:
    """Per chunk size: time per generated token, its split (ms per token and share), the floor."""
    head = ["chunk (sequences)", "per token (ms)", "profiled (ms)", *CATEGORIES, "weights floor (ms)",
            "measured / floor", "KV cache read (ms at bandwidth)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        per_token = 1e-3 / (r["steps"] * r["chunk"])  # microseconds summed over steps -> ms per token
        profiled = r["wall_us"] * per_token
        cells = [f"{r['categories_us'][c] * per_token:.3f} ({100 * r['categories_us'][c] / r['wall_us']:.0f}%)"
                 for c in CATEGORIES]
        floor_ms = 1e3 * floor["weight_bytes"] / floor["bandwidth"] / r["chunk"]
        kv_ms = 1e3 * r["kv_bytes"] / floor["bandwidth"] / r["chunk"]
        lines.append("| " + " | ".join([str(r["chunk"]), f"{1e3 * r['token_s']:.3f}", f"{profiled:.3f}", *cells,
                                        f"{floor_ms:.4f}", f"{1e3 * r['token_s'] / floor_ms:.0f}x",
                                        f"{kv_ms:.4f}"]) + " |")
    return "\n".join(lines)


def docs_section(args, floor: dict, results: list[dict], status: str, command: str) -> str:
    missing = [c for c in args.chunks if c not in {r["chunk"] for r in results}]
    lines = [
        f"## Decode profile: {floor['model_label']}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {floor['device']}; memory bandwidth {floor['bandwidth'] / 1e12:.2f} TB/s "
        f"({floor['bandwidth_source']})",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in common.versions().items() if k != "trl"),
        f"- Settings: 4-bit NF4 (double quant) + LoRA r=16 all-linear (adapter on), "
        f"{'bf16' if args.device == 'cuda' else 'float32'} compute, prompt {args.prompt_length} tokens, "
        f"`generate` with sampling (temperature 1, no top-k/top-p), KV cache on; {args.tokens} decode steps "
        "measured per chunk after the prefill and one warm-up step",
        f"- Weights read per decode step: {floor['weight_bytes'] / common.GIB:.3f} GiB",
        "",
        format_report(floor, results) if results else "(no chunk size finished)",
        "",
        "Each category: milliseconds per generated token under the profiler, and its share of the profiled "
        "step. 4-bit matmuls = everything inside bitsandbytes' Linear4bit layers (dequantisation and matmul); "
        "overhead = the step's wall time minus the time the device was busy. The weights floor is the bytes of "
        "weights one decode step reads over the memory bandwidth, per generated token: no implementation can "
        "generate faster while reading every weight once per step; the KV cache read comes on top of it.",
    ]
    if missing or status != "ok":
        lines += ["", f"Incomplete: the profiling {status}; chunk sizes without figures: "
                      f"{', '.join(map(str, missing)) or 'none'}."]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--arch", default="qwen2.5-1.5b", choices=common.shipped_architectures())
    parser.add_argument("--tiny-shape", action="store_true", help="the architecture's tiny stand-in (dry runs)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 32], help="generation chunk sizes")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps measured per chunk size")
    common.add_suite_part_arguments(parser)
    return parser.parse_args(argv)


REPORT_RESERVE_S = 10  # kept back from the deadline to write the report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="decode-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = str(work)
    for stale in [*work.glob("chunk*.json"), work / "floor.json"]:
        stale.unlink(missing_ok=True)
    child = [sys.executable, "-m", "bench.decode_profile", "--child", "--device", args.device, "--arch", args.arch,
             "--prompt-length", str(args.prompt_length), "--tokens", str(args.tokens), "--work-dir", str(work),
             "--model-cache", args.model_cache, "--chunks", *map(str, args.chunks)]
    if args.tiny_shape:
        child.append("--tiny-shape")
    left = common.seconds_left(args.deadline)
    status = common.run_logged(child, work / "profile.log", None if left is None else left - REPORT_RESERVE_S)
    print(common.log_tail(work / "profile.log", 15 if status == "ok" else 40))
    if not (work / "floor.json").is_file():
        print(f"decode profile: nothing measured (the child {status})", file=sys.stderr)
        return 1
    floor = json.loads((work / "floor.json").read_text())
    results = [json.loads((work / f"chunk{c}.json").read_text()) for c in args.chunks
               if (work / f"chunk{c}.json").is_file()]
    text = docs_section(args, floor, results, status, common.command_line("bench.decode_profile", argv))
    print(text)
    if not args.no_docs:
        key = f"{args.device}-decode-profile"
        common.update_docs(Path(args.docs), key, text)
        print(f"\nwrote the {key} section of {args.docs}")
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
