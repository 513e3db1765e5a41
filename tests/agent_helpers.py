"""Qwen- and Llama-format tokenizers and a scripted model for the multi-turn tests (no hub access).

The tokenizer is character-level over printable ASCII plus the model family's special tokens,
with the family's own chat template (as TRL 1.16 ships it), so tool schemas, tool calls and tool
results render exactly as for a real Qwen or Llama model. The scripted model is a tiny Qwen2
whose generate() answers from a script: the reply of prompt "q<k>" in turn t (t = assistant
turns so far) is SCRIPT[k][t] (LLAMA_SCRIPT[k][t] for Llama's format), so TRL's tool loop and
ours see the same model outputs.
"""

import asyncio
import re
import string

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


LLAMA_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                 "<|python_tag|>"]
# Where each family's assistant turn starts (the scripted model counts them).
ASSISTANT_HEADERS = {"qwen": "<|im_start|>assistant\n", "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


def chat_tokenizer(template: str = "qwen2_5"):
    """`template`: which of TRL's stored chat templates it renders with: qwen2_5, qwen3, or
    llama3_1 (with Llama 3's special tokens, end of turn <|eot_id|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import chat_template_utils

    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(set(string.printable)) + ADDED)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens(ADDED)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left")
    tokenizer.chat_template = getattr(chat_template_utils, f"{template}_chat_template")
    if template.startswith("llama"):
        tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_SPECIAL})
        tokenizer.eos_token = "<|eot_id|>"
    return tokenizer


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


async def mul(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    await asyncio.sleep(0)
    return a * b


def broken(x: str) -> str:
    """A tool that always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError(f"cannot handle {x}")


def hangs(seconds: float) -> str:
    """A tool that takes far too long.

    Args:
        seconds: How long it sleeps.
    """
    import time

    time.sleep(seconds)
    return "woke up"


TOOLS = [add, mul, broken]


def call(name, **arguments):
    import json

    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


END = "<|im_end|>"
SCRIPT = [
    [call("add", a=2, b=3) + END, "The sum is 5." + END],  # one call, then the answer
    ["Let me see." + call("add", a=1, b=2) + "\n" + call("mul", a=3, b=4) + "\n" + call("add", a=5, b=6) + END,
     "3, 12 and 11." + END],  # sync and async calls in one turn
    [call("nope") + "\n" + call("add", x=1) + "\n" + call("broken", x="y") + END,
     "errors everywhere" + END],  # unknown tool, bad arguments, a tool that raises
    ["just 7" + END],  # no tool call
    ['x <tool_call>{"name": </tool_call>' + END],  # malformed: plain text, the trajectory ends
    [call("add", a=1, b=1) + END] * 10,  # calls forever: stopped by max_tool_calling_iterations or the budget
    [call("add", a=4, b=4) + END, "z" * 500],  # the last turn runs out of budget
    [call("add", a="7", b=1) + END, "8" + END],  # an argument typed by the tool's schema ("7" -> 7)
]
def llama_call(name, **arguments):
    import json

    return json.dumps({"name": name, "parameters": arguments})


EOT = "<|eot_id|>"
# Llama 3.1 makes at most one call per turn, a bare JSON object.
LLAMA_SCRIPT = [
    [llama_call("add", a=2, b=3) + EOT, "The sum is 5." + EOT],
    [llama_call("mul", a=3, b=4) + EOT, "12" + EOT],  # an async tool
    [llama_call("nope") + EOT, "no such tool" + EOT],
    [llama_call("add", x=1) + EOT, "bad arguments" + EOT],
    [llama_call("broken", x="y") + EOT, "it failed" + EOT],
    ["just 7" + EOT],
    ['{"name": "add", "parameters": ' + EOT],  # malformed: plain text
    [llama_call("add", a=1, b=1) + EOT] * 10,
    [llama_call("add", a=4, b=4) + EOT, "z" * 500],
]

# Only for our own loop (TRL's would wait for it): a tool that hangs.
HANGING = len(SCRIPT)
SCRIPTS = SCRIPT + [[call("hangs", seconds=60) + END, "gave up" + END]]


def scripted_model(tokenizer, max_position_embeddings: int = 4096):
    """A tiny Qwen2 (real config, parameters and forward) whose generate() replays SCRIPT."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id

    llama = "<|eot_id|>" == tokenizer.eos_token
    header = ASSISTANT_HEADERS["llama" if llama else "qwen"]

    def reply(ids: list[int]) -> list[int]:
        text = tokenizer.decode(ids)
        k = int(re.findall(r"q(\d+)(?:<\|eot_id\|>|<\|im_end\|>)", text)[0])  # the user's message
        turn = text.count(header) - 1
        script = (LLAMA_SCRIPT if llama else SCRIPTS)[k]
        return tokenizer(script[min(turn, len(script) - 1)], add_special_tokens=False)["input_ids"]

    def generate(input_ids, attention_mask=None, max_new_tokens=None, generation_config=None, **kwargs):
        limit = max_new_tokens if max_new_tokens is not None else generation_config.max_new_tokens
        replies = [reply([t for t, m in zip(row.tolist(), mask.tolist()) if m])[:limit]
                   for row, mask in zip(input_ids, attention_mask)]
        width = max(len(r) for r in replies)
        new = torch.tensor([r + [pad] * (width - len(r)) for r in replies], dtype=torch.long)
        return torch.cat([input_ids, new.to(input_ids.device)], 1)

    model.generate = generate
    return model
