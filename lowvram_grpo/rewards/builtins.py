"""The built-in reward functions: the registry (`BUILTIN_REWARDS`), the rule-based rewards
and the text helpers they share, and `code_tests` (defined in code.py), all registered here.
"""

from __future__ import annotations

import difflib
import math
import re
import threading
from collections.abc import Callable
from typing import Any

from lowvram_grpo.rewards.base import RewardFunctionError, completion_text
from lowvram_grpo.rewards.code import CodeTests

# Defaults for the built-ins; rows can override the length ones with dataset columns.
DEFAULT_TARGET_LENGTH = 200  # length_target, when there is no `target_length` column
DEFAULT_MAX_LENGTH = 512  # length_penalty, when there is no `max_length` column
NUMERIC_REL_TOL = 1e-6  # numeric_answer: relative tolerance (or pass rel_tol= via partial)
REPETITION_NGRAM = 3  # repetition_penalty: n-gram size (words)
REPETITION_MAX_PENALTY = -1.0  # repetition_penalty: reward of a fully repeated completion

FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


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


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What a built-in reward takes from its config entry (`args: {...}`): each argument with its
# check (given the value and all of the entry's arguments) and a description of a valid value.
# Checked when the rewards load, before the model does, like config keys. Every other built-in
# reads its inputs from dataset columns only and takes no arguments.
BUILTIN_ARGS: dict[str, dict[str, tuple[Callable[[Any, dict], bool], str]]] = {
    "numeric_answer": {
        "rel_tol": (lambda v, _: _number(v) and v >= 0, "a number >= 0, such as 1e-6"),
    },
    "overlong_penalty": {
        "max_completion_len": (lambda v, _: _whole_number(v) and v > 0, "a whole number of tokens > 0"),
        "soft_punish_cache": (lambda v, args: _whole_number(v) and 0 < v <= args.get("max_completion_len", v),
                              "a whole number of tokens > 0 and at most max_completion_len"),
    },
}


def check_builtin_args(name: str, args: dict) -> None:
    """Raise RewardFunctionError, naming the reward, the argument and a valid value, for an
    argument the built-in reward `name` does not take or a value it cannot use."""
    allowed = BUILTIN_ARGS.get(name, {})
    for key, value in args.items():
        if key not in allowed:
            takes = f"takes only {', '.join(allowed)}" if allowed else "takes no args (it reads dataset columns)"
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RewardFunctionError(f"rewards: {name} has no argument '{key}'; it {takes}.{hint}")
        check, valid = allowed[key]
        if not check(value, args):
            raise RewardFunctionError(f"rewards: {name}'s {key} must be {valid}; got {value!r} "
                                      f"(args: {args})")


# The reward of the offline arithmetic task (builtin:arith, see builtin/arith.py).
@register_reward("arith_answer")
def arith_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion (stripped of spaces) is exactly the sum, else 0.0."""
    return [1.0 if completion_text(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


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


register_reward("code_tests")(CodeTests())
