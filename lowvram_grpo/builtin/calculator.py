"""The offline tools task: two-digit sums ("37+48=" -> "85") with a calculator tool.

The built-in tiny tools model (tiny_tools_model.py) cannot add two-digit numbers in its head, but it
has seen, now and then, how to ask the calculator: `<tool_call>{"name": "add", "arguments":
{"a": 37, "b": 48}}</tool_call>`, read its result and repeat it. GRPO, rewarded by the exact
answer, should make it ask more often: the reward climbs because of tool use, which the same run
without the tool (tools: []) cannot do. Nothing is downloaded: the prompts are generated here.
"""

from __future__ import annotations

import random

# The characters of the task; the tiny tools model's tokenizer is built from these.
ALPHABET = "0123456789+="


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def sums_rows(num_rows: int = 1000, seed: int = 0) -> list[dict]:
    """`num_rows` conversational prompts `a+b=` (a, b two-digit) with their answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)})
    return rows


def warmup_conversations(num_problems: int, tool_every: int, seed: int = 1) -> list[list[dict]]:
    """Supervised warm-up data: each problem answered directly (the sum, which a tiny model can
    only partly learn), and one problem in `tool_every` through the calculator: the call, its
    result, the result repeated as the answer."""
    rng = random.Random(seed)
    conversations = []
    for i in range(num_problems):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        user = {"role": "user", "content": f"{a}+{b}="}
        if i % tool_every == 0:
            call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
            conversations.append([user, {"role": "assistant", "content": "", "tool_calls": [call]},
                                  {"role": "tool", "name": "add", "content": str(a + b)},
                                  {"role": "assistant", "content": str(a + b)}])
        else:
            conversations.append([user, {"role": "assistant", "content": str(a + b)}])
    return conversations
