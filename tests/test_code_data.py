"""The offline code tasks (builtin:code), the MBPP preset's prompt and column, and
`lowvram-grpo rewards` listing every kind."""

from __future__ import annotations

import subprocess
import sys

from lowvram_grpo.config import load_config
from lowvram_grpo.data import format_prompt, load_prompt_data
from lowvram_grpo.rewards.base import RewardContext
from lowvram_grpo.rewards.code import CodeTests
from lowvram_grpo.rewards.loading import load_reward_functions
from lowvram_grpo.rewards.sandbox import SandboxLimits
from lowvram_grpo.rewards.scoring import score_rows


def test_builtin_code_tasks_pass_with_their_solutions_and_fail_with_wrong_ones():
    config = load_config(overrides={"dataset": "builtin:code", "answer_column": None, "rewards": ["code_tests"],
                                    "code_timeout_s": 5})
    rows = load_prompt_data(config).train + load_prompt_data(config).eval
    assert len(rows) >= 12 and any(isinstance(t, dict) for r in rows for t in r["tests"])
    rewards = load_reward_functions(config.rewards, RewardContext(config))
    right = score_rows(rewards, rows, [f"```python\n{r['solution']}```" for r in rows], None)
    assert right.total.tolist() == [1.0] * len(rows)
    wrong = score_rows(rewards, rows, ["def nothing():\n    pass\nprint('nothing')"] * len(rows), None)
    assert wrong.total.max().item() == 0.0


def test_mbpp_preset_shows_the_tests_and_scores_them_from_test_list():
    config = load_config(preset="qwen2.5-1.5b-mbpp")
    row = {"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
           "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
           "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
                         "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"],
           "test_setup_code": "", "challenge_test_list": []}
    prompt = format_prompt(row, config)
    user = prompt[-1]["content"]
    assert user.startswith("Write a function") and "\nassert set(similar_elements((1, 2, 3, 4)" in user
    reward = CodeTests(limits=SandboxLimits(wall_seconds=5), column=config.code_tests_column)
    assert reward(prompts=[prompt], completions=[f"```python\n{row['code']}\n```"], test_list=[row["test_list"]]) \
        == [1.0]


def test_rewards_command_lists_every_kind():
    out = subprocess.run([sys.executable, "-m", "lowvram_grpo", "rewards"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    names = [line.split()[0] for line in out.splitlines()]
    for kind in ("numeric_answer", "code_tests", "model:<hub", "judge:self", "judge:<URL>", "path/to/file.py:function"):
        assert kind in names
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines())  # a description on every line
