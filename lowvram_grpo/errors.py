"""Errors as users see them: one line that names the problem and, where we know it, the fix.

The CLI prints any of the package's error types (ConfigError, DatasetError,
RewardFunctionError, ModelLoadError, ...) as `error: <message>`, without a traceback. The
helpers below describe values and other libraries' errors inside such a message.
"""

from __future__ import annotations

from typing import Any

MAX_DETAIL = 300  # characters of a value or a library's message quoted inside ours


class DatasetError(ValueError):
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
