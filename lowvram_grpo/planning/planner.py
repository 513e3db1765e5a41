"""Memory planner: the chunk sizes that fit a GPU, and what to reduce when nothing does.

- `plan(train_config, vram_gb)` -> `Plan`: the largest `generation_chunk_size`,
  `micro_batch_size` and `logprob_chunk_size` that fit the budget with a 10% safety margin
  (by memory.estimate_memory), or, if even the smallest settings do not fit, what to reduce.
- `format_plan(plan)` -> the breakdown table the CLI (`lowvram-grpo plan`) and the app print.
- `resolve_chunking(config, device)` -> the `Chunking` a run starts with: the config's chunk
  sizes, with "auto" ones planned for `vram_gb` (or the memory the device has).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from lowvram_grpo.config import AUTO, TrainConfig
from lowvram_grpo.planning.chunking import MIN_LOGPROB_CHUNK, Chunking
from lowvram_grpo.planning.memory import CUDA_OVERHEAD_BYTES, GIB, MemoryEstimate, estimate_memory
from lowvram_grpo.planning.model_shape import ModelShape, arch_for_model_name, billions, resolve_model_config

# plan() keeps this fraction of the card free: allocator fragmentation and estimate error.
SAFETY_MARGIN = 0.10

# Candidates plan() tries for the LM-head chunk (rows of B*K positions per chunk).
LOGPROB_CHUNK_CANDIDATES = (1024, 512, 256, 128, 64, 32, MIN_LOGPROB_CHUNK)
MIN_GOOD_LOGPROB_CHUNK = 64  # below this the Python loop over chunks starts to cost time
# Candidates for sequence_chunk_size, largest (fewest extra kernel launches) first.
SEQUENCE_CHUNK_CANDIDATES = (4096, 2048, 1024, 512)


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """The chunk sizes to use on a card of `vram_gb`, and the estimate behind them."""

    fits: bool
    vram_gb: float
    usable_gb: float  # vram_gb minus the safety margin
    generation_chunk_size: int
    micro_batch_size: int
    logprob_chunk_size: int
    estimate: MemoryEstimate  # at the chosen (or, if nothing fits, the smallest) settings
    configured: MemoryEstimate  # at the train config's own settings
    model_name: str
    advice: list[str] = field(default_factory=list)
    offload_activations: bool = False
    sequence_chunk_size: int | None = None
    ram_gb: float = 0.0  # the CPU memory planned with
    longest_completion: int = 0  # the longest max_completion_length that fits (0: none)

    @property
    def chunking(self) -> Chunking:
        return Chunking(self.generation_chunk_size, self.micro_batch_size, self.logprob_chunk_size)

    @property
    def overrides(self) -> dict[str, Any]:
        """The chosen settings as config keys, ready for `load_config(overrides=...)`."""
        return {**self.chunking.as_dict(), "offload_activations": self.offload_activations,
                "sequence_chunk_size": self.sequence_chunk_size}


# --- long-context settings ---------------------------------------------------------------------


def activation_candidates(c: TrainConfig) -> list[tuple[bool, int | None]]:
    """(offload_activations, sequence_chunk_size) pairs to try, least machinery first: neither,
    offloading alone (its copies overlap with compute), then ever smaller sequence chunks
    (each costs one more forward of the per-token modules), without and with offloading.
    A setting the config fixes is the only candidate for it."""
    offloads = [False, True] if c.offload_activations == AUTO else [bool(c.offload_activations)]
    if not c.gradient_checkpointing:
        offloads = [False]
    chunks = [None, *SEQUENCE_CHUNK_CANDIDATES] if c.sequence_chunk_size == AUTO else [c.sequence_chunk_size]
    seq = c.max_prompt_length + c.max_completion_length
    chunks = [s for s in chunks if s is None or s < seq] or [None]  # a chunk as long as the sequence is none
    return [(o, s) for s in chunks for o in offloads]


def machine_ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def host_budget_bytes(c: TrainConfig, ram_gb: float | None = None, margin: float = SAFETY_MARGIN) -> float:
    """CPU memory a plan may fill: `ram_gb`, else the config's, else this machine's, less the margin."""
    return (ram_gb or c.ram_gb or machine_ram_gb()) * GIB * (1 - margin)


def fitting_activation_settings(c: TrainConfig, model_config: Any, budget: float, host_budget: float,
                                candidates: list[tuple[bool, int | None]] | None = None
                                ) -> tuple[bool, int | None, MemoryEstimate] | None:
    """The first candidate (see activation_candidates) with which one sequence at a time fits
    both the GPU budget and the CPU memory; None if none does."""
    for offload, chunk in candidates or activation_candidates(c):
        estimate = estimate_memory(model_config, c, **Chunking.smallest().as_dict(), offload_activations=offload,
                                   sequence_chunk_size=chunk)
        if estimate.total_bytes <= budget and estimate.host_bytes <= host_budget:
            return offload, chunk, estimate
    return None


def longest_completion(c: TrainConfig, vram_gb: float, model_config: Any, ram_gb: float | None = None,
                       candidates: list[tuple[bool, int | None]] | None = None, margin: float = SAFETY_MARGIN,
                       limit: int = 1 << 22) -> int:
    """The longest max_completion_length (up to `limit`) with which one sequence at a time fits
    in `vram_gb` and the CPU memory, with the best of `candidates` (default: what the config
    allows; [(False, None)] is the run without long-context machinery). 0 if none fits."""
    budget, host_budget = vram_gb * GIB * (1 - margin), host_budget_bytes(c, ram_gb, margin)

    def fits(length: int) -> bool:
        trial = dataclasses.replace(c, max_completion_length=length)
        options = candidates or activation_candidates(trial)
        return fitting_activation_settings(trial, model_config, budget, host_budget, options) is not None

    if not fits(1):
        return 0
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan(train_config: TrainConfig, vram_gb: float, model_config: Any = None,
         margin: float = SAFETY_MARGIN, model_name: str | None = None, ram_gb: float | None = None) -> Plan:
    """Choose the largest chunk sizes that fit in `vram_gb` with `margin` kept free.

    Larger generation chunks make generation (most of a GRPO step's time) faster, so the
    generation chunk is maximised first; it only affects the generation phase, so it can be
    chosen independently. Then the micro-batch, then the LM-head chunk (kept >= 64 rows when
    possible). Chunk sizes are divisors of prompts_per_step * num_generations so every chunk is
    full. If even one sequence at a time does not fit, `fits` is False and `advice` says what
    to reduce.

    Long sequences: offload_activations and sequence_chunk_size set to "auto" are chosen first
    (see activation_candidates): the least machinery with which one sequence at a time fits the
    GPU, and whose offloaded activations fit the CPU memory (`ram_gb`, default the config's or
    this machine's). A run that would fit the GPU only by needing more CPU memory than there is
    does not fit, and the advice says how much it needs. `longest_completion` is the longest
    max_completion_length that fits with the best settings the config allows.

    `model_config` defaults to `resolve_model_config(train_config.model_name_or_path)`;
    `model_name` is only the label printed by format_plan.
    """
    if vram_gb <= 0:
        raise ValueError(f"vram_gb must be > 0, got {vram_gb}")
    if model_config is None:
        model_config = resolve_model_config(train_config.model_name_or_path)
        model_name = model_name or _model_label(train_config.model_name_or_path)
    else:
        model_name = model_name or f"a {ModelShape.from_config(model_config).model_type or 'custom'} model"
    budget = vram_gb * GIB * (1 - margin)
    host_budget = host_budget_bytes(train_config, ram_gb, margin)
    ram = host_budget / GIB / (1 - margin)
    sequences = train_config.sequences_per_step
    longest = longest_completion(train_config, vram_gb, model_config, ram, margin=margin)
    found = fitting_activation_settings(train_config, model_config, budget, host_budget)
    # If nothing fits, the estimate shown is the most frugal candidate's (the last one).
    offload, seq_chunk = found[:2] if found else activation_candidates(train_config)[-1]

    def estimate(g: int, m: int, lp: int) -> MemoryEstimate:
        return estimate_memory(model_config, train_config, generation_chunk_size=g, micro_batch_size=m,
                               logprob_chunk_size=lp, offload_activations=offload, sequence_chunk_size=seq_chunk)

    def configured_estimate(g: int, m: int, lp: int) -> MemoryEstimate:
        """The user's own settings; an "auto" one takes the value this plan chose for it."""
        own = [value if (value := getattr(train_config, key)) != AUTO else chosen
               for key, chosen in zip(Chunking.keys(), (g, m, lp))]
        return estimate(*own)

    long_context = dict(offload_activations=offload, sequence_chunk_size=seq_chunk, ram_gb=ram,
                        longest_completion=longest)
    smallest = estimate(1, 1, LOGPROB_CHUNK_CANDIDATES[-1])
    if found is None:
        configured = configured_estimate(1, 1, LOGPROB_CHUNK_CANDIDATES[-1])
        return Plan(fits=False, vram_gb=vram_gb, usable_gb=budget / GIB, generation_chunk_size=1,
                    micro_batch_size=1, logprob_chunk_size=LOGPROB_CHUNK_CANDIDATES[-1], estimate=smallest,
                    configured=configured, model_name=model_name,
                    advice=_advice(smallest, train_config, model_config, budget, host_budget, longest),
                    **long_context)

    def fits(g: int, m: int, lp: int) -> bool:
        trial = estimate(g, m, lp)
        return trial.total_bytes <= budget and trial.host_bytes <= host_budget

    generation = next(g for g in _divisors_desc(sequences) if fits(g, 1, LOGPROB_CHUNK_CANDIDATES[-1]))
    good = [lp for lp in LOGPROB_CHUNK_CANDIDATES if lp >= MIN_GOOD_LOGPROB_CHUNK]
    small = [lp for lp in LOGPROB_CHUNK_CANDIDATES if lp < MIN_GOOD_LOGPROB_CHUNK]
    micro, logprob = 1, LOGPROB_CHUNK_CANDIDATES[-1]
    for candidates in (good, small):
        found = next(((m, lp) for m in _divisors_desc(sequences) for lp in candidates if fits(1, m, lp)), None)
        if found:
            micro, logprob = found
            break
    # Rows beyond micro_batch_size * max_completion_length are never used: do not report more.
    logprob = min(logprob, max(micro * train_config.max_completion_length, LOGPROB_CHUNK_CANDIDATES[-1]))
    chosen = estimate(generation, micro, logprob)
    configured = configured_estimate(generation, micro, logprob)
    advice = []
    if configured.total_bytes > budget:
        advice.append(f"your settings need ~{configured.total_gb:.1f} GB: use the chosen chunk sizes")
    return Plan(fits=True, vram_gb=vram_gb, usable_gb=budget / GIB, generation_chunk_size=generation,
                micro_batch_size=micro, logprob_chunk_size=logprob, estimate=chosen, configured=configured,
                model_name=model_name, advice=advice, **long_context)


def _advice(smallest: MemoryEstimate, c: TrainConfig, model_config: Any, budget: float, host_budget: float,
            longest: int) -> list[str]:
    """What to reduce when even one sequence at a time does not fit."""
    gb = lambda b: f"{b / GIB:.1f} GB"  # noqa: E731
    # Every estimate below is at the smallest chunking, as `smallest` is (and so never meets
    # an "auto" chunk size of the user's config).
    smallest_chunks = Chunking.smallest().as_dict()
    advice = []
    if smallest.static_bytes > budget:
        advice.append(f"the model's weights, LoRA and optimizer alone need ~{gb(smallest.static_bytes)} of the "
                      f"{gb(budget)} usable: choose a smaller model")
        # Only suggest the switches that would actually close the gap.
        if c.quantization != "nf4":
            nf4 = estimate_memory(model_config, dataclasses.replace(c, quantization="nf4"), **smallest_chunks)
            if nf4.static_bytes < budget:
                advice.append(f"or load the base in 4 bits: quantization=nf4 (static ~{gb(nf4.static_bytes)})")
        if c.optimizer != "paged_adamw_8bit":
            adam8 = estimate_memory(model_config, dataclasses.replace(c, optimizer="paged_adamw_8bit"), **smallest_chunks)
            if adam8.static_bytes < budget:
                advice.append(f"or use optimizer=paged_adamw_8bit (static ~{gb(adam8.static_bytes)})")
        if c.lora_r > 8:
            low_rank = estimate_memory(model_config, dataclasses.replace(c, lora_r=8), **smallest_chunks)
            if low_rank.static_bytes < budget:
                advice.append(f"or a smaller adapter: lora_r=8 (static ~{gb(low_rank.static_bytes)})")
        return advice
    peak = smallest.peak_phase
    if smallest.total_bytes <= budget and smallest.host_bytes > host_budget:
        advice.append(f"its offloaded activations need ~{gb(smallest.host_bytes)} of CPU memory, and "
                      f"{gb(host_budget)} is usable here (ram_gb sets what to plan with)")
    else:
        advice.append(f"one sequence of {c.max_prompt_length}+{c.max_completion_length} tokens needs "
                      f"~{gb(smallest.phase_bytes(peak))} in the {peak} phase on top of "
                      f"~{gb(smallest.static_bytes)} static")
    if longest >= 1:  # with everything else unchanged
        advice.append(f"reduce max_completion_length to {longest} or less (or shorten max_prompt_length)")
    else:
        advice.append("reduce max_prompt_length, or choose a smaller model")
    if not c.gradient_checkpointing:
        advice.append("turn gradient_checkpointing on")
    if AUTO not in (c.offload_activations, c.sequence_chunk_size):
        advice.append("or let the planner choose offload_activations=auto and sequence_chunk_size=auto")
    return advice


def _model_label(name: str) -> str:
    arch = arch_for_model_name(name) if not name.startswith("builtin:") else None
    return name if not arch or arch == name.lower() else f"{name} ({arch})"


def format_plan(p: Plan) -> str:
    """The plan as a plain-text table: the breakdown, the total against the card, the choice."""
    est, c = p.estimate, p.estimate.settings
    # Small models (the CPU demo) would read 0.00 GB everywhere: show them in MB.
    unit, scale = ("GB", GIB) if est.total_bytes >= GIB else ("MB", 2**20)
    lines = [f"Memory plan for {p.model_name} ({billions(est.params.total)} params) on a {p.vram_gb:g} GB GPU",
             f"  sequences of up to {c['seq_len']} tokens (prompt + completion), "
             f"{c['dtype_bytes'] * 8}-bit compute", ""]
    width = max(len(k) for k in est.parts) + 2
    lines.append(f"  {'part'.ljust(width)}{unit:>8}")
    for label, value in est.parts.items():
        lines.append(f"  {label.ljust(width)}{value / scale:8.2f}")
    lines.append(f"  {'total'.ljust(width)}{est.total_bytes / scale:8.2f}")
    others = [f"{phase} {est.phase_bytes(phase) / scale:.2f} {unit}" for phase in est.phases
              if phase != est.peak_phase]
    lines.append(f"  (phases do not overlap; the peak is {est.peak_phase}"
                 + (f"; others: {', '.join(others)})" if others else ")"))
    host = ", ".join(f"{label} {value / GIB:.1f} GB" for label, value in est.host_parts.items())
    lines.append(f"  CPU memory: ~{est.host_bytes / GIB:.1f} GB of {p.ram_gb:.0f} GB ({host})")
    if est.kv_bytes_per_token:
        lines.append(f"  generation: the KV cache takes {est.kv_bytes_per_token / 1024:.0f} KB per token of a sequence, "
                     f"{est.kv_bytes_per_token * c['seq_len'] / GIB:.2f} GB per sequence at {c['seq_len']:,} tokens")
    if p.longest_completion:
        lines.append(f"  the longest max_completion_length that fits one sequence at a time: {p.longest_completion:,}")
    lines.append("")
    verdict = "fits" if p.fits else "does NOT fit"
    needs = f"{est.total_gb:.{1 if est.total_gb >= 1 else 2}f}"
    lines.append(f"needs ~{needs} GB of {p.vram_gb:g} GB ({p.usable_gb:.1f} GB usable with a "
                 f"{1 - p.usable_gb / p.vram_gb:.0%} safety margin): {verdict}")
    settings = " ".join(f"{k}={v}" for k, v in p.overrides.items())
    lines.append(f"{'chosen' if p.fits else 'smallest settings'}: {settings}")
    cfg = p.configured.settings
    lines.append(f"your settings (generation_chunk_size={cfg['generation_chunk_size']} "
                 f"micro_batch_size={cfg['micro_batch_size']} logprob_chunk_size={cfg['logprob_chunk_size']}): "
                 f"~{p.configured.total_gb:.1f} GB")
    for note in est.notes:
        lines.append(f"note: {note}")
    for item in p.advice:
        lines.append(f"{'to fit' if not p.fits else 'hint'}: {item}")
    return "\n".join(lines)


# --- the chunking a run starts with ------------------------------------------------------------


def resolve_chunking(config: TrainConfig, device, announce: bool = True) -> Chunking:
    """The config's chunk sizes, with "auto" ones chosen by `plan` for `vram_gb`, or for the
    memory the device has when vram_gb is not set."""
    auto = [key for key in Chunking.keys() if getattr(config, key) == AUTO]
    given = {key: getattr(config, key) for key in Chunking.keys() if key not in auto}
    if not auto:
        return Chunking(**given)
    from lowvram_grpo.planning.backoff import MemoryBudgetError

    budget = config.vram_gb or device_memory_gb(device)
    chosen = plan(config, budget)
    if not chosen.fits:
        raise MemoryBudgetError(f"vram_gb: this run does not fit in {budget:.1f} GB: " + "; ".join(chosen.advice))
    planned = {key: chosen.overrides[key] for key in auto}
    if announce:
        print(f"auto settings for {budget:.1f} GB: " + ", ".join(f"{k}={v}" for k, v in planned.items())
              + f" (estimated peak {chosen.estimate.total_gb:.1f} GB)", flush=True)
    return Chunking(**given, **planned)


def device_memory_gb(device) -> float:
    """What "auto" chunk sizes may plan with when vram_gb is not set. On a GPU: the memory free
    now, because a desktop's display or another job holds the rest and will not give it back,
    plus the CUDA context, which the planner counts itself. On the CPU: the machine's RAM."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return min(total, free + CUDA_OVERHEAD_BYTES) / GIB
    return machine_ram_gb()


def resolve_long_context(config: TrainConfig, device, announce: bool = True) -> tuple[bool, int | None]:
    """(offload_activations, sequence_chunk_size) a run works with: the config's, with "auto"
    ones chosen by `plan` on a GPU (off when the run fits without them) and off on the CPU, where
    offloading saves nothing and the tiny models need no chunks."""
    offload, chunk = config.offload_activations, config.sequence_chunk_size
    if AUTO not in (offload, chunk):
        return bool(offload), chunk
    if device.type != "cuda":
        return offload is True, chunk if chunk != AUTO else None
    from lowvram_grpo.planning.model_shape import PlannerError

    try:
        chosen = plan(config, config.vram_gb or device_memory_gb(device))
    except PlannerError as err:  # an architecture the planner cannot model: the run as configured
        logging.getLogger(__name__).warning("offload_activations/sequence_chunk_size auto: off (%s)", err)
        return offload is True, chunk if chunk != AUTO else None
    settings = (chosen.offload_activations if offload == AUTO else bool(offload),
                chosen.sequence_chunk_size if chunk == AUTO else chunk)
    if announce and (offload == AUTO and settings[0] or chunk == AUTO and settings[1]):
        print(f"long sequences: offload_activations={settings[0]}, sequence_chunk_size={settings[1]} "
              f"(the planner's choice; host memory for offloaded activations ~{chosen.estimate.host_bytes / GIB:.1f} GB)",
              flush=True)
    return settings
