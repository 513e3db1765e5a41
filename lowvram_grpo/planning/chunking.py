"""The chunk sizes a run works with, and the phases of a step whose memory they bound.

`TrainConfig` holds what the user asked for, where a chunk size may be "auto". A run works with
a `Chunking`: the memory planner turns "auto" into numbers (memory.plan), out-of-memory back-off
halves them (backoff.py), checkpoints save them, so a resumed run keeps a shrunk size, and every
metrics record logs them.

A step's memory-heavy phases, by one set of names used by the planner, the back-off, the
trainer's phase hook and bench/planner_check.py:
    generation  rollouts, a chunk of `generation_chunk_size` sequences at a time (KV cache)
    log-probs   reference and old-policy log-probs, no gradients, micro-batch by micro-batch
    update      log-probs with gradients and backward, micro-batch by micro-batch
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GENERATION, LOGPROBS, UPDATE = "generation", "log-probs", "update"
PHASES = (GENERATION, LOGPROBS, UPDATE)

# The smallest LM-head chunk worth using (rows of logits at once); below it, per-chunk overhead
# dominates. The planner's candidates and the back-off both stop here.
MIN_LOGPROB_CHUNK = 16


@dataclass
class Chunking:
    generation_chunk_size: int  # sequences generated at once
    micro_batch_size: int  # sequences per forward/backward
    logprob_chunk_size: int  # positions per LM-head chunk

    # Which sizes bound each phase's memory, in the order back-off shrinks them.
    BOUNDS = {GENERATION: ("generation_chunk_size",),
              LOGPROBS: ("micro_batch_size", "logprob_chunk_size"),
              UPDATE: ("micro_batch_size", "logprob_chunk_size")}
    SMALLEST = {"generation_chunk_size": 1, "micro_batch_size": 1, "logprob_chunk_size": MIN_LOGPROB_CHUNK}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def smallest(cls) -> Chunking:
        return cls(**cls.SMALLEST)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def shrink(self, phase: str) -> str | None:
        """Halve the first size bounding `phase` that can still shrink and describe the change;
        None when every one is at its smallest."""
        for key in self.BOUNDS[phase]:
            value = getattr(self, key)
            if value > self.SMALLEST[key]:
                setattr(self, key, max(self.SMALLEST[key], value // 2))
                return f"{key} {value} -> {getattr(self, key)}"
        return None

    def describe(self, phase: str) -> str:
        return ", ".join(f"{key}={getattr(self, key)}" for key in self.BOUNDS[phase])
