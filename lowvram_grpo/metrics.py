"""What a step reports beyond the loss: peak memory, the update metrics of a step's
iterations, and the sampled completions written to completions.jsonl.

Names follow TRL's (`reward`, `rewards/<fn>/mean`, `kl`, `entropy`, `clip_ratio/region_mean`,
...), so users' habits and dashboards carry over; the step's record itself is assembled where
its numbers are computed, in trainer.grpo_step.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU
    (NaN where the platform cannot say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_resident_bytes() / 2**30


def kv_cache_bytes_per_token(policy, length: int) -> int | None:
    """Generation's KV cache per token of one sequence of `length` tokens, from the model's
    config (None for an architecture the planner cannot model)."""
    from lowvram_grpo.planning.memory import kv_bytes_per_token
    from lowvram_grpo.planning.model_shape import ModelShape, PlannerError

    try:
        shape = ModelShape.from_config(policy.config)
    except PlannerError:
        return None
    return kv_bytes_per_token(shape, policy.dtype.itemsize, length)


def long_context_memory(policy, generation_chunk_size: int, rollout) -> dict[str, float]:
    """Memory that grows with length, as a step used it: `generation/kv_cache_gb`, the KV cache of
    its largest generation chunk at the step's longest length, and `offloaded_activations_gb`,
    the most the update held in CPU memory (with offload_activations; the count restarts)."""
    from lowvram_grpo.offload import offloader_of

    result: dict[str, float] = {}
    length = rollout.prompt_ids.size(1) + rollout.completion_ids.size(1)
    per_token = kv_cache_bytes_per_token(policy, length)
    if per_token is not None:
        sequences = min(generation_chunk_size, rollout.num_sequences)
        result["generation/kv_cache_gb"] = sequences * length * per_token / 2**30
    offloader = offloader_of(policy)
    if offloader is not None:
        result["offloaded_activations_gb"] = offloader.peak_host_bytes / 2**30
        offloader.reset_peak()
    return result


def peak_resident_bytes() -> float:
    """The process's peak resident memory: getrusage on POSIX (`resource` does not exist on
    native Windows), the peak working set there, NaN elsewhere."""
    try:
        import resource
    except ImportError:
        return _windows_peak_working_set() if sys.platform == "win32" else float("nan")
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes, Linux KiB


def _windows_peak_working_set() -> float:
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    counters = Counters(cb=ctypes.sizeof(Counters))
    process = ctypes.windll.kernel32.GetCurrentProcess()  # type: ignore[attr-defined]
    if not ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):  # type: ignore[attr-defined]
        return float("nan")
    return float(counters.PeakWorkingSetSize)


def mean_over_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """One step's update metrics over its num_iterations updates: the mean of each, the count
    of skipped updates, and the loss scale as the last update left it."""
    result = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
    result["step_skipped"] = sum(u["step_skipped"] for u in updates)
    if "loss_scale" in updates[-1]:
        result["loss_scale"] = updates[-1]["loss_scale"]
    return result


def sample_records(step: int, prompts: list, completions: list[str], scores, advantages: torch.Tensor,
                   config, messages: list[list[dict]] | None = None, images: list | None = None) -> list[dict[str, Any]]:
    """The first completions of the step (one group, usually), for completions.jsonl; with
    tools, each one's trajectory as `messages` (the completions browser shows its turns); with a
    prompt's `images` (PIL images, per prompt), their thumbnails too (the app shows them)."""
    G = config.num_generations
    records = []
    for i in range(min(config.num_completions_to_log, len(completions))):
        record = {"step": step, "prompt": prompts[i // G], "completion": completions[i],
                  "reward": float(scores.total[i]), "advantage": float(advantages[i]),
                  "rewards": {name: float(scores.per_function[i, j]) for j, name in enumerate(scores.names)}}
        if messages is not None:
            record["messages"] = messages[i]
        if images and images[i // G]:
            from lowvram_grpo.vision import thumbnail

            record["images"] = [thumbnail(image) for image in images[i // G]]
        if scores.extra:  # columns reward functions gave log_extra
            record["extra"] = {column: values[i] for column, values in scores.extra.items()}
        records.append(record)
    return records
