"""Behaviour of the built-in rewards, loading user rewards, and scoring a batch."""

from __future__ import annotations

import functools
import math
import textwrap

import pytest
import torch

from lowvram_grpo.config import RewardSpec
from lowvram_grpo.rewards.base import RewardFunction, RewardFunctionError, completion_text
from lowvram_grpo.rewards.builtins import (
    BUILTIN_REWARDS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_TARGET_LENGTH,
    arith_answer,
    extract_number,
    numeric_answer,
    register_reward,
)
from lowvram_grpo.rewards.loading import load_reward_functions, resolve_reward
from lowvram_grpo.rewards.scoring import score_completions


def chat(text: str) -> list[dict]:
    """The conversational form of a completion, as TRL passes it."""
    return [{"role": "assistant", "content": text}]


def both_forms(texts: list[str]) -> list[list]:
    """The same completions as plain strings and as conversational messages."""
    return [list(texts), [chat(t) for t in texts]]


def call(name: str, texts: list[str], **columns) -> list[list]:
    """Rewards of a built-in for plain and conversational forms; asserts they agree."""
    fn = BUILTIN_REWARDS[name]
    results = [fn(prompts=[""] * len(texts), completions=c, **columns) for c in both_forms(texts)]
    assert results[0] == results[1], f"{name}: plain and conversational forms disagree"
    return results[0]


# --- helpers ---------------------------------------------------------------------------------


def test_completion_text_handles_every_form():
    assert completion_text("hi") == "hi"
    assert completion_text(chat("hi")) == "hi"
    assert completion_text([]) == ""
    # Tool-call turns: the final message holds the answer; None content is empty text.
    assert completion_text([{"role": "assistant", "content": None}, chat("done")[0]]) == "done"
    assert completion_text(chat([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])) == "ab"


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48 clips... #### 1,234", 1234),
    ("so the answer is \\boxed{42}.", 42),
    ("It costs $1,000 in total.", 1000),
    ("The rate is 12.5%", 12.5),
    ("She has 72 apples", 72),
    ("The temperature is -7 degrees", -7),
    ("x = \u22123", -3),
    ("<answer>3.14</answer> and later 99", 3.14),
    ("first 1 then 2 then 3", 3),
    ("pages 3-5", 5),  # a hyphen between numbers is not a minus sign
    ("1, 2, 3", 3),
    ("no numbers here", None),
    ("<answer>forty-two</answer> 42", None),  # the tagged answer decides, even without a number
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


# --- built-ins -------------------------------------------------------------------------------


def test_builtin_registry_has_every_builtin_with_docstrings():
    expected = {"arith_answer", "exact_answer", "numeric_answer", "format_strict", "format_soft",
                "tag_count", "regex_match", "length_target", "length_penalty", "repetition_penalty"}
    assert expected <= set(BUILTIN_REWARDS)
    assert BUILTIN_REWARDS["arith_answer"] is arith_answer  # registered, not copied
    for name, fn in BUILTIN_REWARDS.items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 20, name


def test_register_reward_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact_answer")(lambda prompts, completions, **kw: [])


def test_arith_answer_both_forms():
    assert call("arith_answer", ["8", " 7 ", "9"], answer=["8", "7", "8"]) == [1.0, 1.0, 0.0]


def test_exact_answer():
    texts = ["<answer> Paris </answer>", "  PARIS\n", "London", "<answer>paris  france</answer>", "x"]
    answers = ["paris", "Paris", "Paris", "Paris   France", None]
    assert call("exact_answer", texts, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]


def test_exact_answer_without_answer_column_says_how_to_fix():
    with pytest.raises(RewardFunctionError, match=r"exact_answer.*`answer` column.*answer_column"):
        BUILTIN_REWARDS["exact_answer"](prompts=[""], completions=["x"])


@pytest.mark.parametrize("completion, reference, expected", [
    ("Adding them up gives #### 1,234", "Natalia ... #### 1,234", 1.0),
    ("Adding them up gives #### 1,235", "Natalia ... #### 1,234", 0.0),
    ("so \\boxed{42}", "42", 1.0),
    ("The total is $1,000.", "1000", 1.0),
    ("It grew by 12.5%", "12.5", 1.0),
    ("She has 72 apples", "#### 72", 1.0),
    ("The answer is -3", "-3", 1.0),
    ("The answer is 3", "-3", 0.0),
    ("<answer>0.3333333334</answer>", "0.3333333333", 1.0),  # within the relative tolerance
    ("<answer>0.334</answer>", "0.3333333333", 0.0),
    ("I do not know", "5", 0.0),
    ("42", "no number in the reference", None),
    ("42", None, None),
])
def test_numeric_answer(completion, reference, expected):
    assert call("numeric_answer", [completion], answer=[reference]) == [expected]


def test_numeric_answer_tolerance_is_configurable_with_partial():
    loose = functools.partial(numeric_answer, rel_tol=0.01)
    assert loose(prompts=[""], completions=["100.5"], answer=["100"]) == [1.0]
    assert numeric_answer(prompts=[""], completions=["100.5"], answer=["100"]) == [0.0]


def test_format_strict():
    good = "<think>\nreasoning\nmore\n</think>\n<answer>\n42\n</answer>"
    texts = [good, good + "\n  ", "Sure! " + good, good + " extra", "<think>r</think><answer>42</answer>"]
    assert call("format_strict", texts) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_soft():
    texts = ["Sure! <think>r</think> so <answer>42</answer> done", "<think>\nr\n</think>\n<answer>\n4\n</answer>",
             "<answer>42</answer><think>r</think>", "<think>r</think> 42"]
    assert call("format_soft", texts) == [1.0, 1.0, 0.0, 0.0]


def test_tag_count():
    texts = ["<think>\nr\n</think>\n<answer>\n42\n</answer>", "<think>r</think>", "<think><think></think>", "none"]
    assert call("tag_count", texts) == [1.0, 0.5, 0.25, 0.0]


def test_rewards_understand_think_blocks():
    """Thinking models reason in <think> before answering; some templates open it in the prompt."""
    reference = ["#### 12"]
    # Numbers inside the reasoning are not the answer; the one after </think> is.
    assert call("numeric_answer", ["<think>3 * 4 = 12? no, 13</think>\nThe answer is 12."], answer=reference) == [1.0]
    assert call("numeric_answer", ["<think>it is 12</think>\nThe answer is 13."], answer=reference) == [0.0]
    # Cut off while still thinking: no answer was given, whatever numbers the reasoning holds.
    assert call("numeric_answer", ["<think>so it is 12 and"], answer=reference) == [0.0]
    assert call("exact_answer", ["<think>maybe 7</think>\n12"], answer=["12"]) == [1.0]
    # The template wrote "<think>\n": the completion starts inside the block.
    opened = "reasoning\n</think>\n<answer>\n12\n</answer>"
    assert call("format_strict", [opened]) == [1.0]
    assert call("format_soft", [opened]) == [1.0]
    assert call("tag_count", [opened]) == [1.0]
    assert call("format_strict", ["<answer>\n12\n</answer>"]) == [0.0]


def test_regex_match():
    texts = ["The answer is 42.", "The answer is 41.", "anything"]
    assert call("regex_match", texts, pattern=[r"\b42\b", r"\b42\b", None]) == [1.0, 0.0, None]
    with pytest.raises(RewardFunctionError, match="`pattern` column"):
        BUILTIN_REWARDS["regex_match"](prompts=[""], completions=["x"])


def test_length_target_counts_tokens_or_words():
    fn = BUILTIN_REWARDS["length_target"]
    ids = [[0] * 200, [0] * 100, [0] * 450]
    assert fn(prompts=[""] * 3, completions=["a", "b", "c"], completion_ids=ids) == [1.0, 0.5, 0.0]
    assert DEFAULT_TARGET_LENGTH == 200
    # Without ids, whitespace words count; the target_length column overrides the default.
    assert call("length_target", ["a b c d", "a b", "a"], target_length=[4, 4, None]) == pytest.approx([1.0, 0.5, 1 / 200])


def test_length_penalty():
    fn = BUILTIN_REWARDS["length_penalty"]
    m = DEFAULT_MAX_LENGTH
    ids = [[0] * 10, [0] * m, [0] * (m + m // 2), [0] * (2 * m), [0] * (5 * m)]
    assert fn(prompts=[""] * 5, completions=[""] * 5, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert call("length_penalty", ["a b", "a b c d", "a b c d e f"], max_length=[4, 4, 4]) == [0.0, 0.0, -0.5]


def test_repetition_penalty():
    texts = ["the cat sat on the mat", "go go go go go go go go go go go", "hi", ""]
    rewards = call("repetition_penalty", texts)
    assert rewards[0] == 0.0
    assert -1.0 <= rewards[1] < -0.85  # 9 trigrams, 1 unique: 1 - 1/9
    assert rewards[1] == pytest.approx(-(1 - 1 / 9))
    assert rewards[2:] == [0.0, 0.0]
    half = call("repetition_penalty", ["a b c a b c"])[0]  # trigrams abc bca cab abc: 3 unique of 4
    assert half == pytest.approx(-0.25)


# --- resolving names -------------------------------------------------------------------------


TRL_STYLE = """
import re

def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]

def helper_score(completions, answer):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def reward_file(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(TRL_STYLE))
    monkeypatch.chdir(tmp_path)
    return path


def test_resolve_builtin():
    assert resolve_reward("format_soft") is BUILTIN_REWARDS["format_soft"]


def test_resolve_from_file_relative_and_absolute(reward_file):
    fn = resolve_reward("my_rewards.py:reward_len")
    assert fn(completions=["x" * 18]) == [-2]
    assert resolve_reward(f"{reward_file}:helper_score").__name__ == "helper_score"


def test_resolve_file_errors(reward_file, tmp_path):
    with pytest.raises(RewardFunctionError, match=r"file not found: .*nope\.py"):
        resolve_reward("nope.py:f")
    with pytest.raises(RewardFunctionError, match=r"no function 'reward_lne'; did you mean 'reward_len'\?.*"
                                                  r"helper_score, reward_len"):
        resolve_reward("my_rewards.py:reward_lne")
    with pytest.raises(RewardFunctionError, match="NOT_A_FUNCTION.*int, not a function"):
        resolve_reward("my_rewards.py:NOT_A_FUNCTION")
    with pytest.raises(RewardFunctionError, match="my_rewards.py:<function>"):
        resolve_reward("my_rewards.py")
    broken = tmp_path / "broken.py"
    broken.write_text("import numpy_that_does_not_exist\n")
    with pytest.raises(RewardFunctionError, match="importing .*broken.py failed: ModuleNotFoundError.*numpy_that"):
        resolve_reward("broken.py:f")


def test_resolve_dotted_path(tmp_path, monkeypatch):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text("def is_short(completions, **kwargs):\n    return [len(c) < 5 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_pkg.scoring.is_short")(completions=["hi"]) == [True]
    assert resolve_reward("my_pkg.scoring:is_short").__name__ == "is_short"
    with pytest.raises(RewardFunctionError, match="no function 'is_long'.*is_short"):
        resolve_reward("my_pkg.scoring.is_long")
    with pytest.raises(RewardFunctionError, match="cannot import module 'no_such_pkg.mod'"):
        resolve_reward("no_such_pkg.mod.fn")


def test_unknown_builtin_lists_builtins_and_suggests():
    with pytest.raises(RewardFunctionError) as error:
        resolve_reward("format_strikt")
    message = str(error.value)
    assert "did you mean 'format_strict'?" in message
    assert all(name in message for name in BUILTIN_REWARDS)
    assert "\n" not in message


def test_load_reward_functions_names_and_weights(reward_file):
    loaded = load_reward_functions([RewardSpec("numeric_answer", 2.0), RewardSpec("my_rewards.py:reward_len", 0.5),
                                    RewardSpec("numeric_answer"), RewardSpec("numeric_answer")])
    assert [r.name for r in loaded] == ["numeric_answer", "reward_len", "numeric_answer_2", "numeric_answer_3"]
    assert [r.weight for r in loaded] == [2.0, 0.5, 1.0, 1.0]
    assert loaded[1].fn(completions=["a" * 20]) == [0]


# --- scoring ---------------------------------------------------------------------------------


def fn_of(name, values, weight=1.0):
    """A reward function that returns fixed values, whatever it is given."""
    return RewardFunction(name=name, fn=lambda completions, **kw: list(values), weight=weight)


def score(reward_functions, n=3, columns=None, completions=None):
    completions = completions or [f"c{i}" for i in range(n)]
    return score_completions(reward_functions, [""] * len(completions), completions,
                             [[1, 2]] * len(completions), columns or {})


def test_score_applies_weights():
    scores = score([fn_of("a", [1.0, 0.0, 1.0], 2.0), fn_of("b", [0.5, 0.5, -1.0], 0.5)])
    assert scores.names == ["a", "b"]
    assert scores.per_function.dtype == torch.float32 and scores.per_function.shape == (3, 2)
    assert scores.total.tolist() == [2.25, 0.25, 1.5]


def test_score_none_is_nan_and_ignored_and_all_none_is_nan():
    scores = score([fn_of("a", [None, 1.0, None], 2.0), fn_of("b", [3.0, None, None])])
    assert torch.isnan(scores.per_function[0, 0]) and torch.isnan(scores.per_function[1, 1])
    assert scores.total[:2].tolist() == [3.0, 2.0]
    assert torch.isnan(scores.total[2])  # no function applies: unscorable, not 0
    metrics = scores.metrics()
    assert metrics["rewards/a/mean"] == 1.0 and metrics["rewards/b/mean"] == 3.0


def test_score_bools_and_numpy_like_outputs():
    scores = score([fn_of("a", [True, False, True]), RewardFunction("t", lambda completions, **k: torch.ones(3), 1.0)])
    assert scores.per_function[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert scores.total.tolist() == [2.0, 1.0, 2.0]


def test_score_raising_function_is_named_and_chained():
    def boom(completions, **kwargs):
        raise ValueError("bad input")

    with pytest.raises(RewardFunctionError, match=r"reward function 'boom' raised ValueError: bad input") as error:
        score([fn_of("ok", [1, 1, 1]), RewardFunction("boom", boom, 1.0)])
    assert isinstance(error.value.__cause__, ValueError)


def test_score_wrong_length_names_function_and_both_lengths():
    with pytest.raises(RewardFunctionError, match=r"'short' returned 2 rewards, but 3 were expected"):
        score([fn_of("short", [1.0, 2.0])])


@pytest.mark.parametrize("returned, match", [
    (1.0, r"'f' returned float 1.0; expected a list of 3 numbers"),
    ("abc", r"'f' returned str 'abc'"),
    ([1.0, "yes", 0.0], r"'f' returned str 'yes' for completion 1; expected a list of 3 numbers"),
    ([1.0, float("nan"), 0.0], r"'f' returned nan for completion 1.*return None, not NaN"),
])
def test_score_bad_outputs_are_explained(returned, match):
    with pytest.raises(RewardFunctionError, match=match):
        score([RewardFunction("f", lambda completions, **kw: returned, 1.0)])


def test_score_restricted_signatures_and_columns_by_name():
    def by_answer(completions, answer):  # no **kwargs: gets only what it names
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    def ignore_rest(completions, **_):
        return [float(len(c)) for c in completions]

    def wants_ids(completion_ids, difficulty, prompts=None):
        return [len(ids) * d for ids, d in zip(completion_ids, difficulty)]

    scores = score([RewardFunction("by_answer", by_answer, 1.0), RewardFunction("ignore_rest", ignore_rest, 0.0),
                    RewardFunction("wants_ids", wants_ids, 1.0)],
                   completions=["x", "yy"], columns={"answer": ["x", "zz"], "difficulty": [1, 3]})
    assert scores.per_function.tolist() == [[1.0, 1.0, 2.0], [0.0, 2.0, 6.0]]
    assert scores.total.tolist() == [3.0, 6.0]


def test_score_missing_column_for_named_parameter_is_explained():
    def by_answer(completions, answer):
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"'by_answer' needs argument\(s\) answer.*add dataset column"):
        score([RewardFunction("by_answer", by_answer, 1.0)])


def test_score_builtin_missing_column_error_passes_through():
    (reward,) = load_reward_functions([RewardSpec("exact_answer")])
    with pytest.raises(RewardFunctionError, match=r"exact_answer.*needs a `answer` column"):
        score([reward])


def test_trl_docs_reward_function_works_unchanged(reward_file):
    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    completions = ["a" * 20, "a" * 25, "a" * 10]
    inline = score([RewardFunction("reward_len", reward_len, 1.0)], completions=completions)
    (from_file,) = load_reward_functions([RewardSpec("my_rewards.py:reward_len")])
    loaded = score([from_file], completions=completions, columns={"answer": ["x"] * 3})
    assert inline.total.tolist() == loaded.total.tolist() == [0.0, -5.0, -10.0]


def test_score_with_builtins_end_to_end_on_conversational_completions():
    rewards = load_reward_functions([RewardSpec("numeric_answer", 1.0), RewardSpec("format_soft", 0.5)])
    completions = [chat("<think>6*7</think><answer>42</answer>"), chat("I think it is 41")]
    scores = score_completions(rewards, [[{"role": "user", "content": "6*7?"}]] * 2, completions,
                               [[1, 2, 3], [4]], {"answer": ["#### 42", "#### 42"]})
    assert scores.names == ["numeric_answer", "format_soft"]
    assert scores.total.tolist() == [1.5, 0.0]
    assert not math.isnan(scores.total.sum().item())


@pytest.mark.parametrize("entry, message", [
    ({"name": "overlong_penalty", "args": {"soft_punish_cache": -5}},
     "overlong_penalty's soft_punish_cache must be a whole number of tokens > 0 and at most max_completion_len"),
    ({"name": "overlong_penalty", "args": {"soft_punish_cache": 999}},
     "overlong_penalty's soft_punish_cache must be a whole number of tokens > 0 and at most max_completion_len"),
    ({"name": "overlong_penalty", "args": {"soft_punish_cahce": 8}},
     "overlong_penalty has no argument 'soft_punish_cahce'; it takes only max_completion_len, soft_punish_cache. "
     "Did you mean 'soft_punish_cache'?"),
    ({"name": "overlong_penalty", "args": {"max_completion_len": 0}},
     "overlong_penalty's max_completion_len must be a whole number of tokens > 0"),
    ({"name": "numeric_answer", "args": {"rel_tol": "small"}}, "numeric_answer's rel_tol must be a number >= 0"),
    ({"name": "length_target", "args": {"target_length": 100}},
     "length_target has no argument 'target_length'; it takes no args (it reads dataset columns)"),
])
def test_bound_arguments_of_built_in_rewards_are_checked_like_config_keys(entry, message):
    from lowvram_grpo.config import load_config
    from lowvram_grpo.rewards.base import RewardContext

    config = load_config(preset="tiny-cpu", overrides={"rewards": [entry], "max_completion_length": 64})
    with pytest.raises(RewardFunctionError) as caught:
        load_reward_functions(config.rewards, RewardContext(config))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_valid_bound_arguments_still_bind():
    from lowvram_grpo.config import load_config
    from lowvram_grpo.rewards.base import RewardContext

    config = load_config(preset="tiny-cpu", overrides={"max_completion_length": 10, "rewards": [
        {"name": "overlong_penalty", "args": {"soft_punish_cache": 5}}, {"name": "numeric_answer", "args": {"rel_tol": 0.1}}]})
    overlong, numeric = load_reward_functions(config.rewards, RewardContext(config))
    assert overlong.fn(["p"] * 3, ["a"] * 3, completion_ids=[[1] * 5, [1] * 8, [1] * 12]) == [0.0, -0.6, -1.0]
    assert numeric.fn(["p"], ["105"], answer=["100"]) == [1.0]
