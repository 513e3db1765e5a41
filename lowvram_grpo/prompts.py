"""Prompts as the model sees them: a system prompt added, a template filled in, a conversation
through the chat template, and the token ids generation feeds the model.

A prompt is a plain string, or a conversation (`[{"role": ..., "content": ...}]`, TRL's
conversational format). Reading and validating datasets is data.py's job; rollout.py needs
only this module to tokenise prompts for generation.
"""

from __future__ import annotations

import difflib
import re

from lowvram_grpo.errors import DatasetError, clip, names, one_line, type_name


def with_system_prompt(prompt: str | list[dict], system_prompt: str | None) -> str | list[dict]:
    """`[system, user]` for a text prompt, or the conversation with the system message
    prepended (unless it already has one); the prompt unchanged without a system prompt."""
    if not system_prompt:
        return list(prompt) if isinstance(prompt, list) else prompt
    system = {"role": "system", "content": system_prompt}
    if isinstance(prompt, list):
        starts_with_system = bool(prompt) and isinstance(prompt[0], dict) \
            and prompt[0].get("role") == "system"
        return list(prompt) if starts_with_system else [system, *prompt]
    return [system, {"role": "user", "content": prompt}]


def fill_template(template: str, row: dict) -> str:
    """Replace `{column}` with the row's value; `{{` and `}}` are literal braces.

    Unlike `str.format`, an empty `{}` stays literal, so math prompts such as
    "put the answer in \\boxed{}" work without escaping. A list of texts or numbers (MBPP's
    `test_list`) is filled in one item per line.
    """
    def substitute(match: re.Match) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        name = match.group(1)
        if name not in row:
            hint = difflib.get_close_matches(name, [str(c) for c in row], n=1)
            did_you_mean = f" Did you mean {{{hint[0]}}}?" if hint else ""
            raise DatasetError(
                f"prompt_template uses {{{name}}}, but the dataset has no column '{name}'. "
                f"Columns: {names(row)}.{did_you_mean} Write {{{{ and }}}} for literal braces.")
        value = row[name]
        if value is None:
            raise DatasetError(f"column '{name}' used in prompt_template is empty (null)")
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return "\n".join(map(str, value))
        if not isinstance(value, (str, int, float)):
            raise DatasetError(
                f"column '{name}' used in prompt_template holds a {type_name(value)}, not "
                "text; prompt_template only fills in text or number columns")
        return str(value)

    return re.sub(r"\{\{|\}\}|\{([^{}]+)\}", substitute, template)


# Where a tokenizer keeps the run's chat_template_kwargs (see set_chat_template_kwargs).
_CHAT_TEMPLATE_KWARGS = "_lowvram_grpo_chat_template_kwargs"


def set_chat_template_kwargs(tokenizer, kwargs: dict) -> None:
    """Make every prompt_text call with this tokenizer pass `kwargs` to the chat template.

    They travel with the tokenizer because the tokenizer is what reaches every place a
    conversation becomes text (the length filter, rollouts, evaluation, the app's try-it): a
    kwarg missed in one of them would make the model see another prompt than the one filtered.
    """
    setattr(tokenizer, _CHAT_TEMPLATE_KWARGS, dict(kwargs))


def chat_template_kwargs(tokenizer, tools: bool = True) -> dict:
    """The run's chat template kwargs this tokenizer carries; with `tools=False` without the
    tools' schemas (which a run with tools adds, see agent/loop.py)."""
    kwargs = dict(getattr(tokenizer, _CHAT_TEMPLATE_KWARGS, {}))
    if not tools:
        kwargs.pop("tools", None)
    return kwargs


def prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    """The text the model actually sees: strings as-is, conversations via the chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "the prompts are conversations (lists of {role, content} messages, or system_prompt "
            "is set), but this model's tokenizer has no chat template to turn them into text. "
            "Use plain-string prompts (set system_prompt=null and give a text prompt_column or "
            "prompt_template), or use a chat/instruct model that has a chat template.")
    try:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                             **chat_template_kwargs(tokenizer))
    except Exception as err:  # Jinja templates raise anything; users need the reason only.
        raise DatasetError(
            f"the model's chat template failed on a prompt ({one_line(err)}). Some templates "
            "reject a system message (set system_prompt=null) or need alternating user/assistant "
            f"turns. The prompt was: {clip(repr(prompt))}") from None


def encode_prompts(tokenizer, prompts: list, batch_size: int = 1000) -> list[list[int]]:
    """Token ids of prompts exactly as generation feeds them to the model.

    A conversation goes through the chat template, which already holds the model's special
    tokens, so none are added; a plain string gets the tokenizer's usual ones (a BOS token on
    Llama-style tokenizers), as the model saw its training text. The length filter and the
    rollouts both use this, so a prompt that passes the filter is never cut at generation.
    """
    if not prompts:
        return []
    add_special_tokens = not isinstance(prompts[0], list)
    ids: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):  # batches bound the tokenizer's memory
        texts = [prompt_text(tokenizer, p) for p in prompts[start:start + batch_size]]
        ids += tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return ids


def prompt_lengths(tokenizer, prompts: list) -> list[int]:
    """Token counts of prompts as the model sees them (see encode_prompts)."""
    return [len(ids) for ids in encode_prompts(tokenizer, prompts)]
