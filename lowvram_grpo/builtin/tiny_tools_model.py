"""The built-in tiny tools model (`builtin:tiny-tools`): the tiny model's recipe for tool calls.

A Qwen2 model as small as `builtin:tiny`, with a tokenizer for the two-digit sums of
calculator.py and a chat template that shows tools and writes tool calls in the Hermes format
(`<tool_call>{"name": "add", "arguments": {"a": 37, "b": 48}}</tool_call>`, as Qwen does), with
`{% generation %}` markers so the warm-up trains on the assistant's tokens only. The pieces of a
call's JSON are single tokens, so a call is ten tokens, not fifty characters.

The warm-up (supervised, on one thread, like tiny_model.py's) answers most problems directly and one
in `TOOL_EVERY` through the calculator, so the model starts out calling it now and then and
mostly guessing otherwise: GRPO has a behaviour to find and reinforce. Built once and cached
next to the tiny model, under its own name: the tiny-cpu demo's model is untouched.
"""

from __future__ import annotations

from pathlib import Path

from lowvram_grpo.builtin import calculator
from lowvram_grpo.builtin.tiny_model import (
    cached_model_path,
    save_atomically,
    single_threaded,
    supervised_warm_up,
    tiny_qwen2,
)

TINY_TOOLS_VERSION = 1
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHAT_TOKENS = ["<|tools|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<tool_call>",
               "</tool_call>"]
# A call's JSON as the chat template's tojson writes it, cut into a few tokens.
JSON_TOKENS = ['{"name": "add", "arguments": {"a": ', ', "b": ', '}}']
CHAT_TEMPLATE = (
    "{% if tools %}<|tools|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}"
    "{% if message.tool_calls is defined %}{% for call in message.tool_calls %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}{% endif %}<eos>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WARMUP_PROBLEMS = 400
TOOL_EVERY = 2  # every other warm-up problem goes through the calculator
WARMUP_STEPS = 300
WARMUP_LR = 3e-3


def tiny_tools_model_path(cache_dir: str | Path | None = None) -> Path:
    """Directory of the built-in tiny tools model, building it first if it is not there yet."""
    return cached_model_path(f"tiny-tools-v{TINY_TOOLS_VERSION}", build_tiny_tools_model, cache_dir)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(calculator.ALPHABET) + CHAT_TOKENS + JSON_TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(CHAT_TOKENS[:6])
    tok.add_tokens(CHAT_TOKENS[6:] + JSON_TOKENS)  # matched whole before the split, kept when decoding
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left",
        additional_special_tokens=CHAT_TOKENS[:6])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_tools_model(path: str | Path, seed: int = 0, warmup_problems: int = WARMUP_PROBLEMS,
                           warmup_steps: int = WARMUP_STEPS) -> Path:
    """Build, warm up and save the tiny tools model and its tokenizer to `path` (atomically).
    (Tests build a less trained one in seconds with fewer problems and steps.)"""
    with single_threaded(seed):
        return save_atomically(Path(path), *_build(warmup_problems, warmup_steps))


def _build(warmup_problems: int, warmup_steps: int):
    from transformers.utils import get_json_schema

    tokenizer = build_tokenizer()
    model = tiny_qwen2(tokenizer, max_positions=128)
    tools = [get_json_schema(calculator.add)]
    input_ids, labels = [], []
    for conversation in calculator.warmup_conversations(warmup_problems, TOOL_EVERY):
        encoded = tokenizer.apply_chat_template(conversation, tools=tools, return_dict=True,
                                                return_assistant_tokens_mask=True)
        ids, trained = encoded["input_ids"], encoded["assistant_masks"]
        input_ids.append(ids)
        labels.append([t if m else -100 for t, m in zip(ids, trained)])
    supervised_warm_up(model, tokenizer.pad_token_id, input_ids, labels, warmup_steps, WARMUP_LR)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
