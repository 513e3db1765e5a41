"""The reward workbench: score completions a user pastes with the run's reward functions and see
the group advantages GRPO would give them, before any GPU time is spent on training."""

from __future__ import annotations

import math
from typing import Any

from lowvram_grpo.config import RewardSpec

SEPARATOR = "---"  # a line of its own between pasted completions


def split_completions(text: str) -> list[str]:
    """Completions pasted one after another, separated by lines of `---`."""
    parts, current = [], []
    for line in (text or "").split("\n"):
        if line.strip() == SEPARATOR:
            parts.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    parts.append("\n".join(current).strip("\n"))
    return [p for p in parts if p.strip()]


def score_group(rewards: list[RewardSpec], row: dict[str, Any], completions: list[str],
                scale_rewards: str = "group") -> tuple[list[str], list[list[Any]]]:
    """Each completion's per-function rewards, weighted total and group advantage, scored as one
    group for the dataset `row` (its prompt and columns such as the answer). Returns the column
    names and one row per completion. A failing reward function raises RewardFunctionError."""
    from lowvram_grpo.grpo import group_advantages
    from lowvram_grpo.rewards import load_reward_functions, score_rows

    if not completions:
        raise ValueError("paste at least one completion (separate several with a line of ---)")
    functions = load_reward_functions(rewards)
    scores = score_rows(functions, [row], completions, None, num_generations=len(completions))
    advantages, _ = group_advantages(scores.total.nan_to_num(0.0), len(completions), scale_rewards)
    rounded = lambda v: None if math.isnan(v) else round(v, 4)  # noqa: E731
    columns = ["completion", *scores.names, "total", "advantage"]
    table = [[text, *(rounded(float(v)) for v in scores.per_function[i]), rounded(float(scores.total[i])),
              round(float(advantages[i]), 4)] for i, text in enumerate(completions)]
    return columns, table
