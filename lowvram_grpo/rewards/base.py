"""What every reward shares: the error, a loaded function, the run's context, a completion's text.

A reward function has TRL's signature, so TRL and open-r1 reward functions work unchanged:

    fn(prompts, completions, completion_ids=None, **dataset_columns) -> list[float | None]

A completion is a string for plain-text prompts and `[{"role": "assistant", "content": ...}]`
for conversational ones; `completion_text` turns either into a string. Dataset columns other
than the prompt arrive as keyword arguments with one value per completion (`answer=[...]`).
`None` means "not applicable": that function is left out of the completion's weighted sum.
Everything that can go wrong becomes a one-line `RewardFunctionError` that names the reward
function and says how to fix it, because a bad reward is usually found mid-run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowvram_grpo.errors import UserError


class RewardFunctionError(UserError, RuntimeError):
    """A reward function that cannot be loaded or misbehaved; the message names it and the fix."""


@dataclass
class RewardContext:
    """What rewards beyond rules need from the run: the config (code_*, reward_model_* and
    judge_* settings), and for judge:self the policy (its base weights judge, the adapter off)
    with its tokenizer. Rewards keep the context and read the policy when they are called, so
    they can be loaded (and checked) before the model, which joins the context later. Without
    a context, those rewards use the config's defaults."""

    config: Any = None  # a TrainConfig
    policy: Any = None
    tokenizer: Any = None


@dataclass
class RewardFunction:
    """A loaded reward function: `name` is its metric name (`rewards/<name>/mean`)."""

    name: str
    fn: Callable
    weight: float
    timeout: float | None = None  # seconds a call may take (reward_timeout); None = no limit


# --------------------------------------------------------------------------------------------
# Text helpers shared by the built-ins (and by anyone writing their own rewards)
# --------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself, or the last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        # Conversational: [{"role": "assistant", "content": ...}]; with tool calls there can be
        # several messages, and the final answer is in the last one.
        return completion_text(completion[-1]) if completion else ""
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    # Content may be None (a tool-call message) or a list of parts ([{"type": "text", ...}]).
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


# The keywords TRL adds to every call besides prompts, completions, completion_ids and columns.
TRAINER_KEYWORDS = ("trainer_state", "log_extra", "log_metric")
