"""Reward functions: built-ins, loading user functions, and scoring a batch of completions.

A reward function has TRL's signature, so TRL and open-r1 reward functions work unchanged:

    fn(prompts, completions, completion_ids=None, **dataset_columns) -> list[float | None]

A completion is a string for plain-text prompts and `[{"role": "assistant", "content": ...}]`
for conversational ones; `completion_text` turns either into a string. Dataset columns other
than the prompt arrive as keyword arguments with one value per completion (`answer=[...]`).
`None` means "not applicable": that function is left out of the completion's weighted sum.

Exactly as TRL 1.16's `_calculate_rewards`, functions also get `trainer_state` (a
transformers `TrainerState`: `global_step`, `max_steps`, `epoch`, for rewards that change
over training), `log_metric(name, value)` (the step's mean lands in metrics.jsonl) and
`log_extra(column, values)` (one value per completion, shown with the sampled completions in
completions.jsonl). `async def` functions run concurrently with each other on one event loop
that lives for the whole run (so clients they create stay usable), as TRL runs them.

Reward names in the config are resolved by `resolve_reward`: a built-in name
(`BUILTIN_REWARDS`, `code_tests` among them), `model:<hub id or dir>` (a reward model, see
reward_model.py), `judge:self` or `judge:<URL>` (an LLM judge, see judges.py),
`path/to/file.py:function`, or a dotted import path `pkg.module.function`. The kinds beyond
rules take their settings (limits, batch sizes, the judge's prompt) from a `RewardContext`.
Everything that can go wrong becomes a one-line `RewardFunctionError` that names the reward
function and says how to fix it, because a bad reward is usually found mid-run.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lowvram_grpo.config import RewardSpec
from lowvram_grpo.errors import one_line
from lowvram_grpo.stopping import CallTimedOut, StepInterrupted, call_with_deadline
from lowvram_grpo.toy import arith_answer

# Defaults for the built-ins; rows can override the length ones with dataset columns.
DEFAULT_TARGET_LENGTH = 200  # length_target, when there is no `target_length` column
DEFAULT_MAX_LENGTH = 512  # length_penalty, when there is no `max_length` column
NUMERIC_REL_TOL = 1e-6  # numeric_answer: relative tolerance (or pass rel_tol= via partial)
REPETITION_NGRAM = 3  # repetition_penalty: n-gram size (words)
REPETITION_MAX_PENALTY = -1.0  # repetition_penalty: reward of a fully repeated completion

FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class RewardFunctionError(RuntimeError):
    """A reward function that cannot be loaded or misbehaved; the message names it and the fix."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

BUILTIN_REWARDS: dict[str, Callable] = {}


def register_reward(name: str) -> Callable:
    """Decorator that adds a function to `BUILTIN_REWARDS` under `name` (returned unchanged)."""

    def decorator(fn: Callable) -> Callable:
        if name in BUILTIN_REWARDS:
            raise ValueError(f"a built-in reward named {name!r} is already registered")
        BUILTIN_REWARDS[name] = fn
        return fn

    return decorator


# The toy task's reward lives next to the task; register it rather than copy it.
register_reward("arith_answer")(arith_answer)


@dataclass
class RewardContext:
    """What rewards beyond rules need from the run: the config (code_*, reward_model_* and
    judge_* settings), and for judge:self the policy (its base weights judge, the adapter off)
    with its tokenizer. Rewards keep the context and read the policy when they are called, so
    they can be loaded (and checked) before the model, which joins the context later. Without
    a context, those rewards use the config's defaults."""

    config: Any = None  # a TrainConfig
    policy: Any = None
    tokenizer: Any = None


@dataclass
class RewardFunction:
    """A loaded reward function: `name` is its metric name (`rewards/<name>/mean`)."""

    name: str
    fn: Callable
    weight: float
    timeout: float | None = None  # seconds a call may take (reward_timeout); None = no limit


# --------------------------------------------------------------------------------------------
# Text helpers shared by the built-ins (and by anyone writing their own rewards)
# --------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself, or the last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        # Conversational: [{"role": "assistant", "content": ...}]; with tool calls there can be
        # several messages, and the final answer is in the last one.
        return completion_text(completion[-1]) if completion else ""
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    # Content may be None (a tool-call message) or a list of parts ([{"type": "text", ...}]).
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def after_thinking(text: str) -> str:
    """The part of a completion after its reasoning: the text after the last `</think>`.

    Thinking models (Qwen3, SmolLM3, DeepSeek-R1 and their distills) reason in a `<think>`
    block before answering, and some chat templates open that block in the prompt, so the
    completion may hold only its closing tag. A completion still inside an unclosed `<think>`
    (cut off by max_completion_length) has given no answer: "" then.
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return "" if "<think>" in text else text


def extract_answer(text: str) -> str:
    """Contents of the last `<answer>...</answer>` if there is one, else the text after any
    `<think>` reasoning (see after_thinking); stripped."""
    matches = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return (matches[-1] if matches else after_thinking(text)).strip()


# A number: optional minus (not after a word character, so "3-5" and "COVID-19" do not make a
# negative), thousands groups "1,234,567" or plain digits, optional decimals. `$`, `%` and units
# around it are simply not part of the match.
_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def extract_number(text: str) -> float | None:
    """The answer number in `text`, or None if there is none.

    Where to look, first match wins: `<answer>` tag contents, text after GSM8K's `####`, the
    last `\\boxed{...}`, else the whole text; numbers inside `<think>` reasoning never count
    (see after_thinking). Within that part the last number is taken, with
    commas, `$`, `%` and trailing units or words ignored ("$1,000" -> 1000, "72 apples" -> 72).
    """
    text = text.replace("\u2212", "-")  # Unicode minus sign, common in LaTeX-ish output
    answers = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    text = text if answers else after_thinking(text)
    boxed = _BOXED_RE.findall(text)
    if answers:
        part = answers[-1]
    elif "####" in text:
        part = text.rsplit("####", 1)[1]
    elif boxed:
        part = boxed[-1]
    else:
        part = text
    numbers_found = _NUMBER_RE.findall(part.replace("$", ""))
    return float(numbers_found[-1].replace(",", "")) if numbers_found else None


def _normalise(text: str) -> str:
    return " ".join(str(text).split()).lower()


def _require_column(kwargs: dict, column: str, reward: str, fix: str) -> list:
    # Built-ins that need a dataset column fail loudly, naming it, instead of scoring everything 0.
    if column not in kwargs:
        raise RewardFunctionError(
            f"reward function '{reward}' needs a `{column}` column in the dataset; {fix} "
            f"(columns given: {sorted(kwargs) or 'none'})")
    return kwargs[column]


def _optional_column(kwargs: dict, column: str, n: int, default: Any) -> list:
    """One value per completion from `column`, `default` where the column or the value is missing."""
    values = kwargs.get(column) or [None] * n
    return [default if v is None else v for v in values]


def _lengths(completions: list, completion_ids: list | None) -> list[int]:
    """Completion lengths in tokens when the ids are given, else in whitespace-separated words."""
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c).split()) for c in completions]


# --------------------------------------------------------------------------------------------
# Built-in rewards
# --------------------------------------------------------------------------------------------

_ANSWER_FIX = "add one, or set answer_column=<column> to say which column holds the reference answers"


@register_reward("exact_answer")
def exact_answer(prompts, completions, **kwargs) -> list[float | None]:
    """1.0 if the answer equals the `answer` column, ignoring case and whitespace, else 0.0.

    The answer is the contents of `<answer>...</answer>` if present, else the whole completion.
    Reads the `answer` column; None (not applicable) for rows whose answer is None or empty.
    """
    answers = _require_column(kwargs, "answer", "exact_answer", _ANSWER_FIX)
    rewards = []
    for completion, reference in zip(completions, answers):
        if reference is None or not str(reference).strip():
            rewards.append(None)
            continue
        got = _normalise(extract_answer(completion_text(completion)))
        rewards.append(1.0 if got == _normalise(reference) else 0.0)
    return rewards


@register_reward("numeric_answer")
def numeric_answer(prompts, completions, rel_tol: float = NUMERIC_REL_TOL, **kwargs) -> list[float | None]:
    """1.0 if the completion's number equals the `answer` column's within `rel_tol`, else 0.0.

    Numbers are found by `extract_number` in both the completion and the reference, so GSM8K
    references ("... #### 1,234") work as they are. Reads the `answer` column; None for rows
    whose reference has no number. Use functools.partial(numeric_answer, rel_tol=...) to change
    the tolerance.
    """
    answers = _require_column(kwargs, "answer", "numeric_answer", _ANSWER_FIX)
    rewards = []
    for completion, reference in zip(completions, answers):
        expected = None if reference is None else extract_number(str(reference))
        if expected is None:
            rewards.append(None)
            continue
        got = extract_number(completion_text(completion))
        ok = got is not None and math.isclose(got, expected, rel_tol=rel_tol, abs_tol=1e-12)
        rewards.append(1.0 if ok else 0.0)
    return rewards


# open-r1's format: the whole completion is exactly a think block then an answer block.
# Chat templates that open the think block in the prompt (DeepSeek-R1's, some Qwen3 and
# SmolLM3 modes) leave the completion without "<think>\n": with_opened_think puts it back.
_STRICT_FORMAT_RE = re.compile(r"<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\s*", re.DOTALL)
_SOFT_FORMAT_RE = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)


def with_opened_think(text: str) -> str:
    """The completion with the `<think>\\n` its prompt opened, when it closes a think block it
    never opened (the chat template wrote the opening tag), so format rewards see one block."""
    if "</think>" in text and "<think>" not in text:
        return "<think>\n" + text.lstrip("\n")
    return text


@register_reward("format_strict")
def format_strict(prompts, completions, **kwargs) -> list[float]:
    """1.0 if the whole completion is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, else 0.0.

    Nothing may come before `<think>` or after `</answer>` except trailing whitespace; a completion
    whose prompt opened the think block (it has `</think>` but no `<think>`) counts as opened.
    Reads no dataset column.
    """
    return [1.0 if _STRICT_FORMAT_RE.fullmatch(with_opened_think(completion_text(c))) else 0.0 for c in completions]


@register_reward("format_soft")
def format_soft(prompts, completions, **kwargs) -> list[float]:
    """1.0 if the completion contains `<think>...</think>` and later `<answer>...</answer>`, else 0.0.

    Anything may come before, between and after the blocks, and newlines are not required.
    Reads no dataset column.
    """
    return [1.0 if _SOFT_FORMAT_RE.search(with_opened_think(completion_text(c))) else 0.0 for c in completions]


@register_reward("tag_count")
def tag_count(prompts, completions, **kwargs) -> list[float]:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that appears exactly once.

    Partial credit (like open-r1's tag_count_reward) that helps a model find the format before
    format_strict ever fires. Reads no dataset column.
    """
    texts = [with_opened_think(completion_text(c)) for c in completions]
    return [sum(0.25 for tag in FORMAT_TAGS if text.count(tag) == 1) for text in texts]


@register_reward("regex_match")
def regex_match(prompts, completions, **kwargs) -> list[float | None]:
    """1.0 if `re.search(pattern, completion)` finds a match, else 0.0.

    Reads the regex from the `pattern` column; None for rows whose pattern is None or empty.
    """
    patterns = _require_column(kwargs, "pattern", "regex_match", "add a column of regular expressions")
    rewards = []
    for completion, pattern in zip(completions, patterns):
        if not pattern:
            rewards.append(None)
            continue
        try:
            found = re.search(pattern, completion_text(completion))
        except re.error as e:
            raise ValueError(f"invalid regular expression {pattern!r} in the `pattern` column: {e}") from e
        rewards.append(1.0 if found else 0.0)
    return rewards


@register_reward("length_target")
def length_target(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1 - |length - target| / target, clipped to [0, 1]: 1.0 at the target length.

    Length is in tokens (`completion_ids`) when available, else in words. The target comes from
    the `target_length` column if present, else DEFAULT_TARGET_LENGTH (200).
    """
    lengths = _lengths(completions, completion_ids)
    targets = _optional_column(kwargs, "target_length", len(completions), DEFAULT_TARGET_LENGTH)
    return [min(1.0, max(0.0, 1.0 - abs(n - t) / max(float(t), 1.0))) for n, t in zip(lengths, targets)]


@register_reward("length_penalty")
def length_penalty(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """0.0 up to `max_length`, then linearly down to -1.0 at twice `max_length` (and below: -1.0).

    A simple overlong penalty in the spirit of Kimi 1.5 / DAPO: it discourages rambling without
    rewarding short answers. Length is in tokens (`completion_ids`) when available, else in
    words. The limit comes from the `max_length` column if present, else DEFAULT_MAX_LENGTH (512).
    Add it next to a correctness reward, typically with a small weight.
    """
    lengths = _lengths(completions, completion_ids)
    limits = _optional_column(kwargs, "max_length", len(completions), DEFAULT_MAX_LENGTH)
    return [-min(1.0, max(0.0, (n - m) / max(float(m), 1.0))) + 0.0 for n, m in zip(lengths, limits)]


@register_reward("overlong_penalty")
def overlong_penalty(prompts, completions, completion_ids=None, max_completion_len: int | None = None,
                     soft_punish_cache: int | None = None, **kwargs) -> list[float]:
    """DAPO's soft overlong punishment, the same as TRL's `get_soft_overlong_punishment`.

    0.0 up to `max_completion_len - soft_punish_cache` tokens, then linearly down to -1.0 at
    `max_completion_len`, -1.0 beyond. It teaches the model to finish before it is cut off,
    without rewarding short answers. `max_completion_len` defaults to the run's
    max_completion_length and `soft_punish_cache` to a fifth of it (DAPO: 4096 of 20480); set
    them with `args: {soft_punish_cache: 64}` in the reward's config entry. Length is in tokens
    (`completion_ids`), else in words. Reads no dataset column.
    """
    if max_completion_len is None:
        raise RewardFunctionError("reward function 'overlong_penalty' needs max_completion_len; give it in the "
                                  "reward's args: {max_completion_len: 256} (the trainer passes its own)")
    cache = max_completion_len // 5 if soft_punish_cache is None else soft_punish_cache
    start = max_completion_len - cache
    rewards = []
    for n in _lengths(completions, completion_ids):
        if n <= start:
            rewards.append(0.0)
        elif n <= max_completion_len:
            rewards.append((start - n) / cache)
        else:
            rewards.append(-1.0)
    return rewards


def _math_parse(text: str, timeout: int | None, bare_answer: bool = False):
    """math-verify's parse, also trying the text as inline LaTeX when it has no `$` or `\\boxed`:
    first when it is known to be just the answer (an `<answer>` tag's contents, where `\\{1, 2\\}`
    would otherwise parse as a stray number), else as a fallback (bare expressions such as `x^2+1`)."""
    from math_verify import parse

    bare = "$" not in text and "\\boxed" not in text
    attempts = [f"${text}$", text] if bare and bare_answer else [text, f"${text}$"] if bare else [text]
    for attempt in attempts:
        parsed = parse(attempt, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


@register_reward("math_answer")
def math_answer(prompts, completions, **kwargs) -> list[float | None]:
    """1.0 if the completion's answer is mathematically equal to the `answer` column's, else 0.0.

    Checked with math-verify, as TRL's accuracy_reward and open-r1 do: LaTeX, fractions,
    `\\boxed{}`, equivalent forms (`\\frac{1}{2}`, `1/2`, `0.5`; `\\frac{\\sqrt2}{2}` and
    `1/\\sqrt2`), sets and intervals. The answer is the last `<answer>...</answer>` if there is
    one, else the whole completion (where a `\\boxed{}` is looked for first). The reference may
    be a full solution with a `\\boxed{}` answer (MATH) or just the answer. None for rows whose
    reference cannot be parsed. For plain-number answers (GSM8K) numeric_answer is enough.
    """
    from math_verify import verify

    answers = _require_column(kwargs, "answer", "math_answer", _ANSWER_FIX)
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    main_thread = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (10, 5) if main_thread else (None, None)
    rewards = []
    for completion, reference in zip(completions, answers):
        gold = _math_parse(str(reference), parse_timeout) if reference is not None else []
        if not gold:
            rewards.append(None)
            continue
        text = completion_text(completion)
        tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        answer = _math_parse(tagged[-1].strip(), parse_timeout, bare_answer=True) if tagged else \
            _math_parse(text, parse_timeout)
        rewards.append(float(verify(gold, answer, timeout_seconds=verify_timeout)) if answer else 0.0)
    return rewards


@register_reward("repetition_penalty")
def repetition_penalty(prompts, completions, **kwargs) -> list[float]:
    """Minus the fraction of repeated word 3-grams: 0.0 with no repetition, towards -1.0 for loops.

    Same as open-r1's repetition penalty with ngram_size=3 and max_penalty=-1: the penalty is
    (1 - unique 3-grams / all 3-grams) * REPETITION_MAX_PENALTY, words lower-cased and split on
    whitespace. Completions shorter than 3 words get 0.0. Reads no dataset column.
    """
    return [_repeated_fraction(completion_text(c)) * REPETITION_MAX_PENALTY + 0.0 for c in completions]


def _repeated_fraction(text: str, n: int = REPETITION_NGRAM) -> float:
    words = text.lower().split()
    ngrams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0


# --------------------------------------------------------------------------------------------
# Resolving names to functions
# --------------------------------------------------------------------------------------------


def resolve_reward(name: str, context: RewardContext | None = None) -> Callable:
    """The function for a reward name: a built-in, `model:<id or dir>`, `judge:self`,
    `judge:<URL>`, `file.py:function` or `pkg.module.function`.

    `context` gives the kinds beyond rules their settings (and judge:self its model).
    Relative file paths are relative to the current directory. A callable is returned as is
    (handy in notebooks). Raises RewardFunctionError with a one-line fix when it cannot.
    """
    if callable(name):
        return name
    name = str(name).strip()
    context = context or RewardContext()
    if name == "code_tests" and context.config is not None:
        return code_reward.code_tests_from_config(context.config)
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if name.startswith("model:"):
        from lowvram_grpo.reward_model import reward_model

        return reward_model(name.removeprefix("model:"), context)
    if name.startswith("judge:"):
        from lowvram_grpo.judges import judge

        return judge(name.removeprefix("judge:"), context)
    if ":" in name:
        source, attr = name.rsplit(":", 1)
        if source.endswith(".py") or "/" in source or "\\" in source:
            return _get_function(_import_file(name, source), attr, name, f"file {source}")
        return _get_function(_import_module(name, source), attr, name, f"module {source}")
    if name.endswith(".py"):
        module = _import_file(name, name)
        raise RewardFunctionError(
            f"reward '{name}': say which function to use, as '{name}:<function>'; "
            f"it defines: {_callables_text(module)}")
    if "." in name:
        source, attr = name.rsplit(".", 1)
        return _get_function(_import_module(name, source), attr, name, f"module {source}")
    raise RewardFunctionError(_unknown_builtin_message(name))


# The kinds of reward besides the built-ins (`lowvram-grpo rewards` lists both).
REWARD_KINDS = {
    "model:<hub id or dir>": "a reward model (sequence classifier, one label) scores prompt + completion",
    "judge:self": "the policy's own base weights (adapter off) give a 0-10 score, divided by 10",
    "judge:<URL>": "an OpenAI-compatible server (llama.cpp, Ollama, vLLM) gives a 0-10 score, divided by 10",
    "path/to/file.py:function": "your own function with TRL's reward signature",
    "package.module.function": "your own function, imported from an installed module",
}


def _unknown_builtin_message(name: str) -> str:
    close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"unknown reward '{name}': {hint}built-ins are {', '.join(sorted(BUILTIN_REWARDS))}; "
            f"or model:<id or dir>, judge:self, judge:<URL>, or your own as 'path/to/file.py:function' or "
            f"'package.module.function' (`lowvram-grpo rewards` lists them all)")


def _import_file(spec: str, source: str):
    path = Path(source).expanduser()
    if not path.is_file():
        raise RewardFunctionError(
            f"reward '{spec}': file not found: {path.resolve()} "
            f"(relative paths are relative to the current directory, {Path.cwd()})")
    path = path.resolve()
    # A stable, unique module name per file, registered in sys.modules so dataclasses, pickling
    # and relative lookups inside the user's module behave as in a normal import.
    module_name = f"lowvram_user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    # The file's folder goes on sys.path while it runs, so it can import its sibling modules.
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[module_name]
        raise RewardFunctionError(f"reward '{spec}': importing {path} failed: {one_line(e)}") from e
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(spec: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise RewardFunctionError(
            f"reward '{spec}': cannot import module '{module_name}' ({one_line(e)}); install it, "
            f"add its folder to PYTHONPATH, or use the file form 'path/to/file.py:function'") from e
    except Exception as e:
        raise RewardFunctionError(f"reward '{spec}': importing module '{module_name}' failed: {one_line(e)}") from e


def _get_function(module, attr: str, spec: str, where: str) -> Callable:
    if not hasattr(module, attr):
        available = _public_callables(module)
        close = difflib.get_close_matches(attr, available, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RewardFunctionError(
            f"reward '{spec}': {where} has no function '{attr}'; {hint}it defines: {_callables_text(module)}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardFunctionError(
            f"reward '{spec}': '{attr}' in {where} is a {type(fn).__name__}, not a function")
    return fn


def _public_callables(module) -> list[str]:
    """Callables the module itself defines (not ones it imported), falling back to all of them."""
    items = {k: v for k, v in vars(module).items() if callable(v) and not k.startswith("_")}
    own = [k for k, v in items.items() if getattr(v, "__module__", None) == module.__name__]
    return sorted(own or items)


def _callables_text(module) -> str:
    return ", ".join(_public_callables(module)) or "no functions"


def _function_name(fn: Callable) -> str:
    # functools.partial and callable objects have no __name__ of their own.
    if isinstance(fn, functools.partial):
        return _function_name(fn.func)
    return getattr(fn, "__name__", None) or type(fn).__name__


def load_reward_functions(specs: list[RewardSpec], context: RewardContext | None = None,
                          timeout: float | None = None) -> list[RewardFunction]:
    """Resolve every spec and bind its `args`; metric names are the built-in name or the
    function's name, made unique. `context` gives judges, reward models and code_tests the
    run's settings (see RewardContext), and overlong_penalty the run's max_completion_length.
    Each call may take at most `timeout` seconds (None: no limit)."""
    loaded, seen = [], {}
    for spec in specs:
        fn = resolve_reward(spec.name, context)
        args = dict(getattr(spec, "args", None) or {})
        if fn is overlong_penalty and context is not None and context.config is not None:
            args.setdefault("max_completion_len", context.config.max_completion_length)
        if args:
            fn = functools.partial(fn, **args)
        base = spec.name if isinstance(spec.name, str) and spec.name in BUILTIN_REWARDS else _function_name(fn)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        loaded.append(RewardFunction(name=name, fn=fn, weight=float(spec.weight), timeout=timeout))
    return loaded


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


# The keywords TRL adds to every call besides prompts, completions, completion_ids and columns.
TRAINER_KEYWORDS = ("trainer_state", "log_extra", "log_metric")


class RewardLog:
    """Collects what reward functions report through the `log_metric` and `log_extra` keywords."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list] = defaultdict(list)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extra[column].extend(values)


@dataclass
class RewardScores:
    """Rewards of a batch: one column per function (NaN = not applicable) and the weighted total,
    plus what the functions logged: `logged` values per metric name, and `extra` columns with
    one value per completion."""

    names: list[str]
    per_function: torch.Tensor  # (N, F) float32, NaN where a function returned None
    total: torch.Tensor  # (N,) nansum of weight * value; NaN where every function returned None
    logged: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`rewards/<name>/mean` and `/std` (NaN-aware, std unbiased like TRL's nanstd), and
        `rewards/<name>/none_frac` for a function that returned None (e.g. a judge's answer
        that held no score) for some completions."""
        out = {}
        for i, name in enumerate(self.names):
            values = self.per_function[:, i]
            missing = torch.isnan(values)
            if missing.any():
                out[f"rewards/{name}/none_frac"] = missing.float().mean().item()
            values = values[~missing]
            out[f"rewards/{name}/mean"] = values.mean().item() if len(values) else float("nan")
            out[f"rewards/{name}/std"] = values.std().item() if len(values) > 1 else float("nan")
        return out

    def select(self, rows: list[int]) -> "RewardScores":
        """These completions' scores (and extra columns); logged metrics stay whole."""
        index = torch.tensor(rows, dtype=torch.long)
        return RewardScores(self.names, self.per_function[index], self.total[index], self.logged,
                            {k: [v[i] for i in rows] for k, v in self.extra.items()})

    @staticmethod
    def concat(parts: list["RewardScores"]) -> "RewardScores":
        """Several batches' scores one after the other (columns a batch lacks read None)."""
        logged: dict[str, list[float]] = defaultdict(list)
        for part in parts:
            for name, values in part.logged.items():
                logged[name].extend(values)
        columns = sorted({k for part in parts for k in part.extra})
        extra = {k: [v for part in parts for v in part.extra.get(k, [None] * len(part.total))] for k in columns}
        return RewardScores(parts[0].names, torch.cat([p.per_function for p in parts]),
                            torch.cat([p.total for p in parts]), dict(logged), extra)


def score_rows(reward_functions: list[RewardFunction], rows: list[dict], completions: list[str],
               completion_ids: list[list[int]] | None, num_generations: int = 1,
               should_stop: Callable[[], bool] | None = None, trainer_state: Any = None) -> RewardScores:
    """Score `num_generations` completions per dataset row (a row's completions contiguous):
    each completion is paired with its row's prompt and other columns, and conversational
    prompts get TRL's conversational completion form. See score_completions for `should_stop`
    and `trainer_state`."""
    prompts = [row["prompt"] for row in rows for _ in range(num_generations)]
    if isinstance(prompts[0], list):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    columns = {key: [row.get(key) for row in rows for _ in range(num_generations)]
               for key in rows[0] if key != "prompt"}
    return score_completions(reward_functions, prompts, completions, completion_ids, columns, should_stop,
                             trainer_state)


def score_completions(
    reward_functions: list[RewardFunction],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None,
    columns: dict[str, list],
    should_stop: Callable[[], bool] | None = None,
    trainer_state: Any = None,
) -> RewardScores:
    """Call every reward function on the batch (as TRL does) and combine the results.

    Each function gets `prompts`, `completions`, `completion_ids`, the dataset `columns` (one
    value per completion) and TRL's `trainer_state` (a fresh one when None), `log_extra`,
    `log_metric` as keyword arguments, or only those its signature accepts. Plain functions
    run one after the other; `async def` ones run concurrently with each other.
    A call that outlives its function's timeout raises RewardFunctionError naming it; once
    `should_stop()` is true the call is abandoned (StepInterrupted), so that a stop request
    never waits on a reward function that may never return.
    """
    n = len(completions)
    _check_batch(prompts, completions, completion_ids, columns)
    log = RewardLog()
    if trainer_state is None:  # outside training (evaluation, tests): a fresh state, as before step 1
        from transformers import TrainerState

        trainer_state = TrainerState()
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns,
              "trainer_state": trainer_state, "log_extra": log.log_extra, "log_metric": log.log_metric}
    per_function = torch.full((n, len(reward_functions)), float("nan"), dtype=torch.float32)
    pending = {}  # column -> coroutine of an async function, awaited together below
    for i, reward in enumerate(reward_functions):
        result = _call_reward(reward, kwargs, should_stop)
        if inspect.isawaitable(result):
            pending[i] = _awaited(reward, result)
        else:
            per_function[:, i] = torch.tensor(_validate_output(reward.name, result, n), dtype=torch.float32)
    if pending:
        results = _run_concurrently(list(pending.values()), should_stop)
        for i, result in zip(pending, results):
            per_function[:, i] = torch.tensor(_validate_output(reward_functions[i].name, result, n),
                                              dtype=torch.float32)
    weights = torch.tensor([r.weight for r in reward_functions], dtype=torch.float32)
    total = (per_function * weights).nansum(dim=1)
    # nansum would turn "no function applies" into 0, a real-looking reward; keep it NaN as TRL does.
    total[torch.isnan(per_function).all(dim=1)] = float("nan")
    for column, values in log.extra.items():
        if len(values) != n:
            raise RewardFunctionError(
                f"log_extra('{column}', ...) got {len(values)} values in all, but there are {n} completions; "
                f"pass one value per completion")
    return RewardScores(names=[r.name for r in reward_functions], per_function=per_function, total=total,
                        logged=dict(log.metrics), extra=dict(log.extra))


# One event loop for every async reward call of the process, in a daemon thread (as TRL does):
# it works inside notebooks, whose own loop is already running, and objects that async reward
# functions keep between calls (HTTP clients, semaphores) stay bound to a live loop.
_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="lowvram-grpo-async-rewards", daemon=True).start()
    return _LOOP


def _run_concurrently(coroutines: list, should_stop: Callable[[], bool] | None = None) -> list:
    async def gather():
        return await asyncio.gather(*coroutines)

    future = asyncio.run_coroutine_threadsafe(gather(), _event_loop())
    try:  # each call has its own timeout (see _awaited); here only a stop request is watched for
        return call_with_deadline(future.result, None, should_stop)
    except StepInterrupted:
        future.cancel()
        raise


async def _awaited(reward: RewardFunction, awaitable) -> Any:
    try:
        return await asyncio.wait_for(awaitable, reward.timeout)
    except RewardFunctionError:
        raise
    except asyncio.TimeoutError:
        raise _timed_out(reward) from None
    except Exception as e:
        raise RewardFunctionError(f"reward function '{reward.name}' raised {one_line(e)}") from e


def _timed_out(reward: RewardFunction) -> RewardFunctionError:
    return RewardFunctionError(
        f"reward function '{reward.name}' did not return within reward_timeout={reward.timeout:g} s "
        "(stuck in a loop, or waiting on something?); make it faster, or raise reward_timeout "
        "(reward_timeout=none: no limit)")


def _check_batch(prompts, completions, completion_ids, columns) -> None:
    n = len(completions)
    reserved = {"prompts", "completions", "completion_ids", *TRAINER_KEYWORDS} & set(columns)
    if reserved:
        raise ValueError(f"dataset columns {sorted(reserved)} clash with reward function arguments; rename them")
    sizes = {"prompts": len(prompts), **{k: len(v) for k, v in columns.items()}}
    if completion_ids is not None:
        sizes["completion_ids"] = len(completion_ids)
    wrong = {k: v for k, v in sizes.items() if v != n}
    if wrong:
        raise ValueError(f"every batch input needs one value per completion ({n}); got lengths {wrong}")


def _call_reward(reward: RewardFunction, kwargs: dict, should_stop: Callable[[], bool] | None = None) -> Any:
    """Call one function: its result, or for an async function the coroutine; raise naming it."""
    accepted = _accepted_kwargs(reward, kwargs)
    try:
        return call_with_deadline(lambda: reward.fn(**accepted), reward.timeout, should_stop)
    except (RewardFunctionError, StepInterrupted):
        raise
    except CallTimedOut:
        raise _timed_out(reward) from None
    except Exception as e:
        raise RewardFunctionError(f"reward function '{reward.name}' raised {one_line(e)}") from e


def _accepted_kwargs(reward: RewardFunction, kwargs: dict) -> dict:
    """All kwargs for `fn(..., **kwargs)`; only the named ones for `fn(completions, answer)`."""
    try:
        params = inspect.signature(reward.fn).parameters
    except (TypeError, ValueError):  # some C callables have no signature: pass everything
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [k for k, p in params.items()
               if p.kind in named and p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise RewardFunctionError(
            f"reward function '{reward.name}' needs argument(s) {', '.join(missing)}, but the batch only "
            f"has {', '.join(k for k in kwargs if k not in TRAINER_KEYWORDS)} (and TRL's "
            f"{', '.join(TRAINER_KEYWORDS)}); add dataset column(s) with those names or give them defaults")
    return {k: v for k, v in kwargs.items() if k in params and params[k].kind in named}


def _validate_output(name: str, result: Any, n: int) -> list[float]:
    expected = f"expected a list of {n} numbers (one per completion; None for 'not applicable')"
    if hasattr(result, "tolist"):  # numpy arrays and tensors, as TRL accepts them
        result = result.tolist()
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise RewardFunctionError(f"reward function '{name}' returned {_short(result)}; {expected}")
    values = list(result)
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function '{name}' returned {len(values)} rewards, but {n} were expected "
            f"(one per completion); make it return exactly one reward per completion")
    return [_as_float(name, v, i, expected) for i, v in enumerate(values)]


def _as_float(name: str, value: Any, index: int, expected: str) -> float:
    if value is None:
        return float("nan")
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):  # numpy/torch scalars
        value = value.item()
    if not isinstance(value, numbers.Real):  # bool is an int, so True/False count as 1/0
        raise RewardFunctionError(
            f"reward function '{name}' returned {_short(value)} for completion {index}; {expected}")
    if not math.isfinite(value):
        raise RewardFunctionError(
            f"reward function '{name}' returned {value} for completion {index}; rewards must be finite "
            f"numbers (return None, not NaN, for 'not applicable')")
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# The kinds that live in their own modules register themselves; imported last because they
# use the helpers above.
from lowvram_grpo import code_reward  # noqa: E402,F401  (registers code_tests)
