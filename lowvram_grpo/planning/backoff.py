"""Out-of-memory back-off: halve the chunk size that ran out and redo the same work.

A GRPO step's memory depends on completion lengths, which nobody knows in advance: the same
settings can fit for a hundred steps and then meet a batch of long completions. Instead of
crashing a long run, the trainer catches CUDA's out-of-memory error around each phase of the
step, halves the chunk size that bounds that phase's memory, and redoes the phase. The
optimizer only steps after a phase completes, so no step is lost and none is applied twice.
The smaller setting is kept for the rest of the run.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from lowvram_grpo.errors import UserError
from lowvram_grpo.planning.chunking import Chunking

T = TypeVar("T")
logger = logging.getLogger(__name__)


class MemoryBudgetError(UserError, RuntimeError):
    """Out of memory even at the smallest chunk sizes; the message says what to reduce."""


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def retry_on_oom(phase: str, chunking: Chunking, attempt: Callable[[Chunking], T], events: list[str],
                 hint: str = "") -> T:
    """Run `attempt(sizes)`; on out-of-memory halve what bounds `phase` in `chunking` and run it
    again. Each attempt gets a copy of the sizes in force when it starts: it works with those,
    and the shrunk ones stay in `chunking` for the rest of the run. `hint` (what this phase's
    memory grows with) joins the message when nothing is left to halve."""
    while True:
        try:
            return attempt(dataclasses.replace(chunking))
        except torch.OutOfMemoryError:
            pass  # leave the except block first: its traceback keeps the failed tensors alive
        free_memory()
        change = chunking.shrink(phase)
        if change is None:
            raise MemoryBudgetError(
                f"out of memory during {phase} even with {chunking.describe(phase)}: reduce "
                "max_completion_length, max_prompt_length or num_generations, or use a smaller model "
                "(`lowvram-grpo plan` estimates what fits)" + (f"; {hint}" if hint else ""))
        events.append(f"out of memory during {phase}: {change}")
        logger.warning(f"out of memory during {phase}; {change}; redoing it")
