"""Reward functions exactly as TRL 1.16 calls them, and the DAPO / math built-ins.

- Reward files written the way TRL's docs and open-r1 write them, unchanged (plus TRL's own
  `trl.rewards` functions by import path): async functions, `trainer_state`, `log_metric` and
  `log_extra` included, scored as TRL's `_calculate_rewards` scores them.
- `async def` functions run concurrently with each other.
- In a run, log_metric values land in metrics.jsonl, log_extra columns in completions.jsonl,
  and trainer_state counts the steps.
- overlong_penalty equals TRL's get_soft_overlong_punishment; math_answer checks equivalence.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from lowvram_grpo.config import RewardSpec, load_config
from lowvram_grpo.rewards.base import RewardContext, RewardFunctionError
from lowvram_grpo.rewards.builtins import BUILTIN_REWARDS, math_answer, overlong_penalty
from lowvram_grpo.rewards.loading import load_reward_functions
from lowvram_grpo.rewards.scoring import score_completions, score_rows
from lowvram_grpo.rundir import RunDir

# The way open-r1 (src/open_r1/rewards.py) writes its rewards: conversational completions,
# a `solution` column, math-verify, None to skip unparseable references.
OPEN_R1_STYLE = r'''
import re
from typing import Optional

from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify


def accuracy_reward(completions: list[list[dict[str, str]]], solution: list[str], **kwargs) -> list[Optional[float]]:
    """Reward function that checks if the completion is the same as the ground truth."""
    contents = [completion[0]["content"] for completion in completions]
    rewards = []
    for content, sol in zip(contents, solution):
        gold_parsed = parse(sol, extraction_mode="first_match")
        if len(gold_parsed) != 0:
            answer_parsed = parse(
                content,
                extraction_config=[
                    LatexExtractionConfig(
                        normalization_config=NormalizationConfig(
                            nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all",
                            units=True,
                        ),
                        boxed_match_priority=0,
                        try_extract_without_anchor=False,
                    )
                ],
                extraction_mode="first_match",
            )
            try:
                reward = float(verify(gold_parsed, answer_parsed))
            except Exception as e:
                print(f"verify failed: {e}, answer: {answer_parsed}, gold: {gold_parsed}")
                reward = None
        else:
            reward = None
            print("Failed to parse gold solution: ", sol)
        rewards.append(reward)
    return rewards


def format_reward(completions, **kwargs):
    """Reward function that checks if the reasoning process is enclosed within <think> and </think> tags, while the final answer is enclosed within <answer> and </answer> tags."""
    pattern = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content, re.DOTALL | re.MULTILINE) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def tag_count_reward(completions, **kwargs) -> list[float]:
    """Reward function that checks if we produce the desired number of think and answer tags associated with `format_reward()`."""

    def count_tags(text: str) -> float:
        count = 0.0
        if text.count("<think>\n") == 1:
            count += 0.25
        if text.count("\n</think>\n") == 1:
            count += 0.25
        if text.count("\n<answer>\n") == 1:
            count += 0.25
        if text.count("\n</answer>") == 1:
            count += 0.25
        return count

    contents = [completion[0]["content"] for completion in completions]
    return [count_tags(c) for c in contents]
'''

# The way TRL's GRPOTrainer docs write custom rewards: plain-text completions, **kwargs,
# extra columns by name, async, trainer_state, log_extra and log_metric.
TRL_DOCS_STYLE = r'''
import asyncio
import re


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    matches = [re.match(pattern, content) for content in completions]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


async def async_reward_func(prompts, completions, **kwargs):
    await asyncio.sleep(0.01)
    return [float(len(completion) > 5) for completion in completions]


def length_schedule_reward(completions, trainer_state, **kwargs):
    # Ask for shorter completions as training progresses.
    progress = trainer_state.global_step / max(trainer_state.max_steps, 1)
    return [-progress * len(completion) for completion in completions]


def logging_reward(completions, ground_truth, log_extra=None, log_metric=None, **kwargs):
    rewards = [1.0 if gt in completion else 0.0 for completion, gt in zip(completions, ground_truth)]
    if log_extra:
        log_extra("golden_answer", list(ground_truth))
        log_extra("completion_length", [len(c) for c in completions])
    if log_metric:
        log_metric("accuracy", sum(rewards) / len(rewards))
    return rewards
'''


@pytest.fixture
def reward_files(tmp_path, monkeypatch):
    (tmp_path / "open_r1_rewards.py").write_text(textwrap.dedent(OPEN_R1_STYLE))
    (tmp_path / "trl_docs_rewards.py").write_text(textwrap.dedent(TRL_DOCS_STYLE))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _load(*names):
    return load_reward_functions([RewardSpec(n) for n in names])


def test_open_r1_reward_file_unchanged(reward_files):
    functions = _load("open_r1_rewards.py:accuracy_reward", "open_r1_rewards.py:format_reward",
                      "open_r1_rewards.py:tag_count_reward")
    rows = [{"prompt": [{"role": "user", "content": "What is 1/3 + 1/3?"}], "solution": r"$\frac{2}{3}$"},
            {"prompt": [{"role": "user", "content": "Name a colour."}], "solution": "blue"}]  # gold not math
    completions = ["<think>\nadd\n</think>\n<answer>\n$\\boxed{\\frac{2}{3}}$\n</answer>",
                   "<think>\nhmm\n</think>\n<answer>\n$\\boxed{0.5}$\n</answer>"]
    scores = score_rows(functions, rows, completions * 2, None, num_generations=2)
    per_function = scores.per_function.tolist()
    assert [row[0] for row in per_function[:2]] == [1.0, 0.0]
    assert all(row[0] != row[0] for row in per_function[2:]), "an unparseable gold is None (NaN): skipped"
    assert [row[1] for row in per_function] == [1.0] * 4 and [row[2] for row in per_function] == [1.0] * 4


def test_trl_docs_reward_file_unchanged(reward_files):
    from transformers import TrainerState

    names = ["reward_len", "format_reward_func", "reward_func", "async_reward_func", "length_schedule_reward",
             "logging_reward"]
    functions = _load(*(f"trl_docs_rewards.py:{n}" for n in names))
    completions = ["<think>x</think><answer>\\boxed{7}</answer>", "seven", "a" * 20, "\\boxed{8}"]
    state = TrainerState(global_step=5, max_steps=10)
    scores = score_completions(functions, ["Q"] * 4, completions, None, {"ground_truth": ["7", "7", "8", "8"]},
                               trainer_state=state)
    by_name = {name: scores.per_function[:, i].tolist() for i, name in enumerate(scores.names)}
    assert by_name["reward_len"] == [-abs(20 - len(c)) for c in completions]
    assert by_name["format_reward_func"] == [1.0, 0.0, 0.0, 0.0]
    assert by_name["reward_func"] == [1.0, 0.0, 0.0, 1.0]
    assert by_name["async_reward_func"] == [1.0, 0.0, 1.0, 1.0]
    assert by_name["length_schedule_reward"] == [-0.5 * len(c) for c in completions]
    assert by_name["logging_reward"] == [1.0, 0.0, 0.0, 1.0]
    assert scores.logged == {"accuracy": [0.5]}
    assert scores.extra == {"golden_answer": ["7", "7", "8", "8"], "completion_length": [len(c) for c in completions]}


def test_trl_own_reward_functions_by_import_path():
    functions = load_reward_functions([RewardSpec("trl.rewards.accuracy_reward"),
                                       RewardSpec("trl.rewards.think_format_reward")])
    completions = [[{"role": "assistant", "content": "<think>\nsum\n</think>\nSo \\boxed{\\frac{1}{3}}"}],
                   [{"role": "assistant", "content": "It is \\boxed{\\frac{1}{2}}"}]]
    prompts = [[{"role": "user", "content": "1/6 + 1/6?"}]] * 2
    scores = score_completions(functions, prompts, completions, None, {"solution": [r"\frac{1}{3}"] * 2})
    assert scores.per_function.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    # accuracy_reward reports what it parsed through log_extra, as in TRL's completions table.
    assert scores.extra["solution"] == [r"\frac{1}{3}"] * 2 and len(scores.extra["answer_parsed"]) == 2


def test_async_reward_functions_run_concurrently():
    import asyncio

    events = {}

    def waiter(mine: str, other: str):
        async def reward(completions, **kwargs):
            loop_events = events.setdefault(asyncio.get_running_loop(), {"a": asyncio.Event(), "b": asyncio.Event()})
            loop_events[mine].set()
            # Finishes only if the other function is running at the same time.
            await asyncio.wait_for(loop_events[other].wait(), timeout=5)
            return [1.0] * len(completions)
        reward.__name__ = f"waits_for_{other}"
        return reward

    functions = load_reward_functions([RewardSpec(waiter("a", "b")), RewardSpec(waiter("b", "a"))])
    scores = score_completions(functions, ["p"] * 3, ["c"] * 3, None, {})
    assert scores.total.tolist() == [2.0] * 3


def test_async_reward_errors_name_the_function():
    async def broken(completions, **kwargs):
        raise KeyError("solution")

    async def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="reward function 'broken' raised KeyError"):
        score_completions(load_reward_functions([RewardSpec(broken)]), ["p"] * 2, ["c"] * 2, None, {})
    with pytest.raises(RewardFunctionError, match="'short' returned 1 rewards, but 2 were expected"):
        score_completions(load_reward_functions([RewardSpec(short)]), ["p"] * 2, ["c"] * 2, None, {})


def test_log_extra_needs_one_value_per_completion():
    def bad(completions, log_extra, **kwargs):
        log_extra("note", ["x"])
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"log_extra\('note', ...\) got 1 values in all, but there are 2"):
        score_completions(load_reward_functions([RewardSpec(bad)]), ["p"] * 2, ["c"] * 2, None, {})


def test_a_run_logs_what_reward_functions_report(tiny_cache, tmp_path, monkeypatch):
    (tmp_path / "run_rewards.py").write_text(textwrap.dedent('''
        def answer_with_logging(completions, answer, trainer_state, log_metric, log_extra, **kwargs):
            rewards = [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]
            log_metric("my/accuracy", sum(rewards) / len(rewards))
            log_metric("my/global_step", trainer_state.global_step)
            log_extra("expected", list(answer))
            return rewards
    '''))
    monkeypatch.chdir(tmp_path)
    from lowvram_grpo.trainer import train

    config = load_config(preset="tiny-cpu", overrides={
        "output_dir": str(tmp_path / "run"), "max_steps": 2, "save_every": 100, "log_completions_every": 1,
        "rewards": ["run_rewards.py:answer_with_logging"]})
    train(config, progress=False)
    records = RunDir(tmp_path / "run").metrics()
    assert [r["my/global_step"] for r in records] == [0.0, 1.0], "trainer_state counts optimizer steps done"
    assert all(r["my/accuracy"] == pytest.approx(r["rewards/answer_with_logging/mean"]) for r in records)
    samples = RunDir(tmp_path / "run").completions()
    assert samples and all(s["extra"]["expected"] == json.loads(json.dumps(s["extra"]["expected"])) for s in samples)
    assert all(s["extra"]["expected"] == str(eval(s["prompt"].rstrip("="))) for s in samples)


def test_overlong_penalty_is_trls_soft_overlong_punishment():
    from trl.rewards import get_soft_overlong_punishment

    trl_reward = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=5)
    ids = [[1] * n for n in range(0, 26)]
    ours = overlong_penalty(prompts=None, completions=[""] * len(ids), completion_ids=ids, max_completion_len=20,
                            soft_punish_cache=5)
    assert ours == trl_reward(completion_ids=ids)
    # In a run, max_completion_len is the run's and the cache a fifth of it unless given.
    context = RewardContext(load_config(overrides={"max_completion_length": 10}))
    (loaded,) = load_reward_functions([RewardSpec("overlong_penalty")], context)
    assert loaded.name == "overlong_penalty"
    assert loaded.fn(prompts=None, completions=[""] * 3, completion_ids=[[1] * 8, [1] * 9, [1] * 10]) == \
        [0.0, -0.5, -1.0]
    (custom,) = load_reward_functions([RewardSpec("overlong_penalty", args={"soft_punish_cache": 5})], context)
    assert custom.fn(prompts=None, completions=[""], completion_ids=[[1] * 8]) == [-0.6]


@pytest.mark.parametrize("completion, reference, expected", [
    ("<answer>12</answer>", "12", 1.0),
    ("so the answer is $\\boxed{\\frac{1}{3}}$", "\\frac{1}{3}", 1.0),
    ("<answer>1/3</answer>", "$\\frac{1}{3}$", 1.0),
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
    ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "The answer is $\\boxed{\\frac{\\sqrt{2}}{2}}$.", 1.0),  # a MATH solution
    ("<answer>(x+1)^2</answer>", "x^2+2x+1", 1.0),
    ("<answer>\\{2, 1\\}</answer>", "\\{1,2\\}", 1.0),
    ("<answer>0.3333</answer>", "\\frac{1}{3}", 0.0),
    ("<answer>13</answer>", "12", 0.0),
    ("no idea", "12", 0.0),
    ("<answer>12</answer>", "", None),
])
def test_math_answer_checks_equivalence(completion, reference, expected):
    assert math_answer(prompts=[""], completions=[completion], answer=[reference]) == [expected]
    chat = [[{"role": "assistant", "content": completion}]]
    assert math_answer(prompts=[""], completions=chat, answer=[reference]) == [expected]
    assert BUILTIN_REWARDS["math_answer"] is math_answer
