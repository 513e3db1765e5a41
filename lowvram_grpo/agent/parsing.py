"""Tool calls in the model's own format: reading them from its output, writing results back.

Reading uses transformers' response parsing (`tokenizer.parse_response`, driven by the
tokenizer's `response_template`). Models that ship a response template use theirs. For those
that do not, one is set here from the chat template's tool-call format: the Hermes format
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3, Hermes, the built-in
tiny tools model) and Llama 3.1/3.2's bare `{"name": ..., "parameters": {...}}`, the same
templates TRL 1.16 sets for those models, so a completion parses the same way in both.

Writing a tool result back goes through the chat template too, token ids spliced after the
model's own (never re-tokenising what it generated): `tool_suffix_ids` renders a one-call dummy
conversation with and without the tool messages and keeps the difference, as TRL's
`_get_tool_suffix_ids` does. That needs a prefix-preserving template (earlier messages render
the same whatever follows), checked once by `check_chat_template`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lowvram_grpo.config import ConfigError
from lowvram_grpo.prompts import chat_template_kwargs

_TEMPLATES = Path(__file__).parent / "chat_templates"
# Models' own chat templates that are not prefix-preserving -> their training variants (see
# chat_templates/README.md).
TRAINING_TEMPLATES = {(_TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8"):
                      (_TEMPLATES / "qwen3_training.jinja").read_text(encoding="utf-8")}

# transformers response templates (the data format `parse_response` reads), as TRL 1.16 sets
# them for Qwen and Llama 3; the anchors and end-of-turn patterns are filled in per tokenizer.
_HERMES_FIELDS = {
    "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
    "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                   "transform": {"type": "function", "function": "{content}"}},
}
_LLAMA3_TOOL_CALLS = {
    "open_pattern": r'\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*', "repeats": True, "content": "json",
    "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
}


def _dummy_tool_conversation(name: str = "tool_name_a8f3") -> list[dict]:
    return [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": {"arg_b9d4": "val_d6e7"}}}]},
            {"role": "tool", "name": name, "content": "content_c4f9"}]


def _render(tokenizer, messages: list[dict], **kwargs) -> Any:
    return tokenizer.apply_chat_template(messages, **{**chat_template_kwargs(tokenizer, tools=False), **kwargs})


def check_chat_template(tokenizer) -> None:
    """Make the tokenizer ready for tool calls: its chat template renders a whole tool-calling
    exchange and is prefix-preserving, and it has a response template (set here for the Hermes
    and Llama 3 formats). A ConfigError naming `tools` otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("tools: the model's tokenizer has no chat template, so it cannot be shown tools or "
                          "their results; use a chat/instruct model")
    conversation = _dummy_tool_conversation()
    try:
        rendered = _render(tokenizer, conversation, tokenize=False)
    except Exception as err:
        raise ConfigError(f"tools: the model's chat template cannot render a tool call and its result ({err}); "
                          "use a model whose chat template supports tools") from None
    if not all(s in rendered for s in ("tool_name_a8f3", "arg_b9d4", "val_d6e7", "content_c4f9")):
        raise ConfigError("tools: the model's chat template drops tool calls or tool results; use a model whose "
                          "chat template supports tools (Qwen2.5/Qwen3, Llama 3.1+, ...)")
    if not _prefix_preserving(tokenizer, conversation):
        training = TRAINING_TEMPLATES.get(tokenizer.chat_template)
        if training is not None:  # the model's own template, known: its training variant
            tokenizer.chat_template = training
    if not _prefix_preserving(tokenizer, conversation):
        raise ConfigError("tools: the model's chat template renders earlier messages differently once a tool "
                          "result follows (it is not prefix-preserving), so tool results cannot be spliced after "
                          "the model's tokens; set the tokenizer's chat_template to a training-safe one (TRL ships "
                          "them: trl/chat_templates/*_training.jinja)")
    if getattr(tokenizer, "response_template", None) is None:
        tokenizer.response_template = _response_template(tokenizer, rendered)


def _prefix_preserving(tokenizer, conversation: list[dict]) -> bool:
    prefix = _render(tokenizer, conversation[:2], tokenize=True, return_dict=False)
    full = _render(tokenizer, conversation, tokenize=True, return_dict=False, add_generation_prompt=True)
    return full[:len(prefix)] == prefix


def _response_template(tokenizer, rendered: str) -> dict:
    """A response template for the chat template's tool-call format (see the module docstring)."""
    user_only = [{"role": "user", "content": "hi"}]
    bare = _render(tokenizer, user_only, tokenize=False)
    with_prompt = _render(tokenizer, user_only, tokenize=False, add_generation_prompt=True)
    # What the template writes before the model's answer: where parsing starts.
    anchor = with_prompt[len(bare):] if with_prompt.startswith(bare) else ""
    end = re.escape(tokenizer.eos_token) + r"\s*"
    template: dict[str, Any] = {"defaults": {"role": "assistant"}}
    if anchor:
        template["start_anchor"] = anchor
    if "<tool_call>" in rendered:
        template["fields"] = {**_HERMES_FIELDS, "content": {"close_pattern": end, "content": "text"}}
    elif '"parameters"' in rendered:
        template["fields"] = {"tool_calls": {**_LLAMA3_TOOL_CALLS, "close_pattern": r"\}" + end},
                              "content": {"close_pattern": end, "content": "text"}}
    else:
        raise ConfigError("tools: the model writes tool calls in a format without a known parser (known: "
                          "<tool_call>{json}</tool_call> as Qwen and Hermes, Llama 3's JSON); set "
                          "tokenizer.response_template (see transformers' chat response parsing docs)")
    return template


def parse_assistant(tokenizer, ids: list[int], prefix: list[int], tools: list | None) -> dict:
    """One assistant turn as a message: {"role", "content", optional "tool_calls"}. Exactly TRL
    1.16's `parse_response`: a malformed tool call makes the turn plain text (the decoded ids),
    so the trajectory ends there rather than the run."""
    try:
        parsed = tokenizer.parse_response(ids, prefix=prefix, tools=tools)
        if parsed is None:  # so heavily truncated that even the content is lost
            raise ValueError("parse_response returned None")
        if isinstance(parsed.get("content"), str):
            parsed["content"] = parsed["content"].removesuffix(tokenizer.eos_token)
        if not parsed.get("content"):
            parsed["content"] = ""
        if "tool_calls" in parsed:
            _check_tool_calls(parsed["tool_calls"])
    except (ValueError, TypeError):
        parsed = {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
    return parsed


def _check_tool_calls(tool_calls: Any) -> None:
    """Every call has a string name; missing arguments mean none (TRL's _validate_tool_calls)."""
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list):
        raise ValueError("tool_calls must be a list")
    for call in tool_calls:
        if not isinstance(call, dict):
            raise ValueError("a tool call must be a dict")
        target = call.get("function", call)
        if not isinstance(target, dict) or not isinstance(target.get("name"), str):
            raise ValueError("a tool call needs a name")
        if target.get("arguments") is None:
            target["arguments"] = {}


def tool_suffix_ids(tokenizer, tool_messages: list[dict]) -> list[int]:
    """The token ids the chat template puts after the model's end-of-turn token for these tool
    results, up to and including the next assistant header (TRL's _get_tool_suffix_ids)."""
    calls = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = _render(tokenizer, dummy, tokenize=True, return_dict=False)
    full = _render(tokenizer, dummy + tool_messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    # Some templates (Qwen) write "<|im_end|>\n" after a turn: the model's turn ends at the EOS,
    # so the suffix starts right after it.
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if eos:
        prefix = prefix[:eos[-1] + 1]
    if full[:len(prefix)] != prefix:
        raise ValueError("the chat template is not prefix-preserving for tool results")
    return full[len(prefix):]
