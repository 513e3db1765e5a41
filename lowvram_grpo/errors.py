"""Errors as users see them: one line that names the problem and, where we know it, the fix.

Every error a user can cause (bad input rather than a bug) derives from `UserError`:
ConfigError (config.py), DatasetError (here), ModelLoadError (model.py), RewardFunctionError
(rewards/base.py), PlannerError (planning/model_shape.py) and MemoryBudgetError
(planning/backoff.py). The CLI prints any of them as `error: <message>`, without a traceback,
and catches them by this one class, without importing the modules that raise them. Each also
keeps its built-in base (ValueError, RuntimeError), so `except ValueError` still sees it. The
helpers below describe values and other libraries' errors inside such a message.
"""

from __future__ import annotations

from typing import Any

MAX_DETAIL = 300  # characters of a value or a library's message quoted inside ours


class UserError(Exception):
    """Bad input rather than a bug: the message names the problem and the fix, in one line."""


class DatasetError(UserError, ValueError):
    """A dataset problem; the message names the file, row and fix in one paragraph. `key` is
    the config key to change (the app marks that field): dataset, prompt_column, answer_column..."""

    def __init__(self, message: str, key: str = "dataset"):
        super().__init__(message)
        self.key = key


def clip(text: str, limit: int = MAX_DETAIL) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(err: BaseException) -> str:
    """`TypeName: message` of another library's exception, on one line and clipped."""
    text = clip(" ".join(str(err).split()))
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def names(items) -> str:
    """Column or key names for a message: the first 20, and how many in all."""
    shown = [str(x) for x in items]
    if not shown:
        return "none"
    return ", ".join(shown[:20]) + (f", ... ({len(shown)} in all)" if len(shown) > 20 else "")


def type_name(value: Any) -> str:
    """A value's type as JSON calls it."""
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(value), type(value).__name__)
