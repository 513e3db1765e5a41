"""What a step reports beyond the loss: peak memory, the update metrics of a step's
iterations, and the sampled completions written to completions.jsonl.

Names follow TRL's (`reward`, `rewards/<fn>/mean`, `kl`, `entropy`, `clip_ratio/region_mean`,
...), so users' habits and dashboards carry over; the step's record itself is assembled where
its numbers are computed, in trainer.grpo_step.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / (2**30 if sys.platform == "darwin" else 2**20)


def mean_over_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """One step's update metrics over its num_iterations updates: the mean of each, the count
    of skipped updates, and the loss scale as the last update left it."""
    result = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
    result["step_skipped"] = sum(u["step_skipped"] for u in updates)
    if "loss_scale" in updates[-1]:
        result["loss_scale"] = updates[-1]["loss_scale"]
    return result


def sample_records(step: int, prompts: list, completions: list[str], scores, advantages: torch.Tensor,
                   config) -> list[dict[str, Any]]:
    """The first completions of the step (one group, usually), for completions.jsonl."""
    G = config.num_generations
    records = []
    for i in range(min(config.num_completions_to_log, len(completions))):
        record = {"step": step, "prompt": prompts[i // G], "completion": completions[i],
                  "reward": float(scores.total[i]), "advantage": float(advantages[i]),
                  "rewards": {name: float(scores.per_function[i, j]) for j, name in enumerate(scores.names)}}
        if scores.extra:  # columns reward functions gave log_extra
            record["extra"] = {column: values[i] for column, values in scores.extra.items()}
        records.append(record)
    return records
