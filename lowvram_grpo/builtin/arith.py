"""The offline toy task: single-digit addition ("3+5=" -> "8").

Small enough that the built-in tiny model (see `tiny_model.py`) can learn it on two CPU cores in a
minute or two, and with a reward that is exact and cheap to check, so the demo's reward curve
means something. The prompts are generated on the fly: nothing is downloaded.
"""

from __future__ import annotations

import random

# Every character the task uses; the tiny model's tokenizer is built from exactly these.
ALPHABET = "0123456789+="


def arith_rows(num_rows: int = 1000, seed: int = 0) -> list[dict[str, str]]:
    """`num_rows` prompts `a+b=` with their answers, a and b drawn uniformly from 0..9."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def all_arith_rows() -> list[dict[str, str]]:
    """Each of the 100 distinct problems once (used for the tiny model's warm-up)."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]

