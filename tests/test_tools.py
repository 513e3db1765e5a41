"""Tools and environments: loading (errors name the key), running calls (a hanging tool is
stopped, failures become error results and are counted), the sandboxed python tool, and what
reward functions receive from a multi-turn rollout."""

import textwrap
import time

import pytest

from lowvram_grpo.agent.loop import Agent, final_answer, tool_metrics
from lowvram_grpo.agent.tools import ToolBox, ToolCounts, load_environment, load_tools, python_tool, tool_schema
from lowvram_grpo.config import ConfigError, load_config
from lowvram_grpo.rewards import RewardFunction, completion_text, load_reward_functions
from lowvram_grpo.rewards.scoring import score_rows
from tests.agent_helpers import add, mul


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_tools_load_from_files_and_modules_with_their_schemas(tmp_path):
    path = write(tmp_path, "my_tools.py", '''
        def shout(text: str) -> str:
            """Upper-case a text.

            Args:
                text: What to shout.
            """
            return text.upper()
    ''')
    tools = load_tools([f"{path}:shout", "lowvram_grpo.builtin.calculator.add"])
    assert [t.__name__ for t in tools] == ["shout", "add"]
    schema = tool_schema(tools[0])["function"]
    assert schema["name"] == "shout" and schema["description"] == "Upper-case a text."
    assert schema["parameters"]["properties"]["text"] == {"type": "string", "description": "What to shout."}


@pytest.mark.parametrize("source, spec, message", [
    ("def f(x):\n    return x\n", "{path}:f", "type hint"),
    ("def f(x: int) -> int:\n    return x\n", "{path}:f", "docstring"),
    ("x = 1\n", "{path}:g", "has no 'g'"),
    ("x = 1\n", "{path}:x", "not a function"),
    ("raise ValueError('boom')\n", "{path}:f", "importing"),
    ("", "missing_file.py:f", "file not found"),
    ("", "no_such_module_xyz.f", "cannot import module"),
])
def test_bad_tools_are_one_clear_error_naming_the_key(tmp_path, source, spec, message):
    path = write(tmp_path, "tools_bad.py", source)
    with pytest.raises(ConfigError) as err:
        load_tools([spec.format(path=path)])
    assert err.value.key == "tools" and message in str(err.value)


def test_config_keys_are_validated():
    config = load_config(overrides={"tools": ["python"], "tool_timeout": 2, "max_tool_calling_iterations": 3})
    assert (config.tools, config.tool_timeout, config.max_tool_calling_iterations) == (["python"], 2.0, 3)
    for overrides, key in [({"tool_timeout": 0}, "tool_timeout"), ({"max_tool_calling_iterations": -1},
                                                                    "max_tool_calling_iterations"),
                           ({"tools": ["python", "python"]}, "tools")]:
        with pytest.raises(ConfigError) as err:
            load_config(overrides=overrides)
        assert err.value.key == key


def hangs(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke up"


async def hangs_async(seconds: float) -> str:
    """Sleep, asynchronously.

    Args:
        seconds: How long.
    """
    import asyncio

    await asyncio.sleep(seconds)
    return "woke up"


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_a_hanging_or_failing_tool_becomes_an_error_result_and_is_counted():
    box = ToolBox([add, mul, hangs, hangs_async], timeout=0.3)
    counts = ToolCounts()
    started = time.monotonic()
    messages = box.run([call("hangs", seconds=30), call("add", a=1, b=2), call("hangs_async", seconds=30),
                        call("nope"), call("add", x=1), call("mul", a=2, b=5)], counts)
    assert time.monotonic() - started < 5, "a hanging tool held up the rollout"
    # Plain calls in order, then the async ones (TRL's order).
    assert [m["name"] for m in messages] == ["hangs", "add", "nope", "add", "hangs_async", "mul"]
    assert "did not return within 0.3 seconds" in messages[0]["content"]
    assert messages[1]["content"] == "3"
    assert messages[2]["content"] == "{'error': 'Tool nope not found.'}"
    assert "unexpected keyword argument 'x'" in messages[3]["content"]
    assert "did not return within" in messages[4]["content"] and messages[5]["content"] == "10"
    assert (counts.calls, counts.failures) == (6, 4)
    assert counts.per_tool == {"hangs": 1, "add": 2, "hangs_async": 1, "nope": 1, "mul": 1}
    metrics = tool_metrics([counts, ToolCounts(turns=1)])
    assert metrics["tools/call_frequency"] == 3.0 and metrics["tools/failure_frequency"] == pytest.approx(4 / 6)
    assert metrics["tools/calls/add"] == 1.0


def test_the_python_tool_runs_in_the_sandbox():
    python = python_tool(timeout_s=5.0, memory_mb=256)
    assert tool_schema(python)["function"]["name"] == "python"
    box, counts = ToolBox([python], timeout=30.0), ToolCounts()
    ok, crash = box.run([call("python", code="print(6 * 7)"), call("python", code="1 / 0")], counts)
    assert ok["content"].strip() == "42"
    assert "ZeroDivisionError" in crash["content"] and counts.failures == 1


ENVIRONMENT = '''
    class Counter:
        """Counts towards a target given in the dataset row."""

        def reset(self, target, **row):
            self.target, self.value = int(target), 0
            return f" Reach {target}."

        def step(self, by: int) -> int:
            """Add to the counter.

            Args:
                by: How much to add.
            """
            self.value += by
            return self.value

        def get_reward(self):
            return float(self.value == self.target)
'''


def test_an_environment_gives_each_rollout_its_tools_prompt_and_reward(tmp_path):
    path = write(tmp_path, "counter_env.py", ENVIRONMENT)
    factory = load_environment(f"{path}:Counter")
    agent = Agent(tools=[add], environment=factory, timeout=5.0)
    assert [s["function"]["name"] for s in agent.schemas()] == ["add", "step"]
    rows = [{"prompt": [{"role": "user", "content": "Count."}], "target": 3}]
    prompts, toolboxes, environments = agent.start(rows, num_generations=2)
    assert prompts[0][-1]["content"] == "Count. Reach 3." and rows[0]["prompt"][-1]["content"] == "Count."
    assert environments[0] is not environments[1]
    toolboxes[0].run([call("step", by=3)], ToolCounts())
    toolboxes[1].run([call("step", by=1)], ToolCounts())
    assert agent.environment_reward()(environments) == [1.0, 0.0]
    assert agent.environment_reward().__name__ == "Counter"


def test_an_environment_without_reset_is_refused(tmp_path):
    path = write(tmp_path, "bad_env.py", "class Env:\n    pass\n")
    with pytest.raises(ConfigError, match="environment_factory: .* no reset"):
        load_environment(f"{path}:Env")


def test_rewards_receive_the_trajectory_and_read_the_final_answer():
    trajectory = [{"role": "assistant", "content": "", "tool_calls": [call("add", a=40, b=2)]},
                  {"role": "tool", "name": "add", "content": "42"},
                  {"role": "assistant", "content": "42"}]
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen["completions"] = completions
        return [1.0]

    rewards = [RewardFunction("spy", spy, 1.0)]
    rows = [{"prompt": [{"role": "user", "content": "40+2="}], "answer": "42"}]
    exact = load_reward_functions(load_config(overrides={"rewards": ["arith_answer"]}).rewards)
    scores = score_rows(rewards + exact, rows, ["42"], None, 1, completion_messages=[trajectory])
    assert seen["completions"] == [trajectory]
    assert completion_text(trajectory) == final_answer(trajectory) == "42"
    assert scores.per_function.tolist() == [[1.0, 1.0]]


def test_the_app_offers_tools_safely(tmp_path):
    from lowvram_grpo.app.setup import AppContext, tool_problem

    shared = AppContext(tmp_path, allow_custom_code=False, allow_local_paths=False, allow_code_execution=False)
    trusting = AppContext(tmp_path, allow_custom_code=True, allow_local_paths=False, allow_code_execution=True)
    assert tool_problem("tools", ["lowvram_grpo.builtin.calculator.add"], shared) is None
    assert "--allow-code-execution" in tool_problem("tools", ["python"], shared)
    assert "--allow-custom-code" in tool_problem("tools", ["my_tools.py:f"], shared)
    assert "--allow-custom-code" in tool_problem("environment_factory", "env.py:Env", shared)
    assert all(tool_problem(k, v, trusting) is None for k, v in
               [("tools", ["python", "my_tools.py:f"]), ("environment_factory", "env.py:Env")])


def test_the_guess_number_example_environment():
    from lowvram_grpo.builtin.guess_number import guess_number_rows

    row = guess_number_rows(3, seed=1)[0]
    agent = Agent(tools=[], environment=load_environment("lowvram_grpo.builtin.guess_number.GuessNumber"), timeout=5.0)
    assert [s["function"]["name"] for s in agent.schemas()] == ["guess"]
    _, (box,), (game,) = agent.start([row], num_generations=1)
    low, high, counts = 1, 100, ToolCounts()
    while True:  # bisection finds it within 7 guesses
        middle = (low + high) // 2
        answer = box.run([call("guess", number=middle)], counts)[0]["content"]
        if answer == "correct":
            break
        low, high = (middle + 1, high) if answer == "higher" else (low, middle - 1)
    assert game.secret == middle and counts.calls <= 7
    assert agent.environment_reward()([game]) == [pytest.approx(1.0 - 0.1 * (counts.calls - 1))]
    assert load_config(preset="qwen3-1.7b-guess-number").rewards == []


def test_a_stop_request_does_not_wait_for_a_slow_tool():
    from lowvram_grpo.stopping import StepInterrupted

    stop_at = time.monotonic() + 0.3
    box = ToolBox([hangs, hangs_async], timeout=60.0, should_stop=lambda: time.monotonic() > stop_at)
    for name in ("hangs", "hangs_async"):
        stop_at = time.monotonic() + 0.3
        with pytest.raises(StepInterrupted):
            box.run([call(name, seconds=60)], ToolCounts())
        assert time.monotonic() - stop_at < 3
