"""Tools the model may call during a rollout, and environments that provide them.

A tool is a plain Python function (sync or `async def`) with type hints and a Google-style
docstring, TRL's convention: transformers' `get_json_schema` turns it into the JSON schema the
chat template shows the model (`apply_chat_template(..., tools=...)`), so the hints and the
docstring's `Args:` are what the model reads about it.

    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.

        Args:
            a: The first number.
            b: The second number.
        \"\"\"
        return a + b

Config: `tools: [python, my_tools.py:add, my_pkg.tools.search]`. `python` is the built-in: it
runs the model's program in the code sandbox (sandbox.py) with the limits of `code_tests`
(`code_timeout_s`, `code_memory_mb`), so the safe default needs no user code at all.

An environment (`environment_factory: my_env.py:MyEnv`, TRL's `environment_factory`) is a
class made once per rollout: `reset(**row)` starts an episode for a dataset row and returns text
added to the prompt (or None); its public methods are that rollout's tools; an optional
`get_reward()` is one more reward function, named after the class.

Running a call (`ToolBox.run`) never raises: an unknown tool, bad arguments, an exception or a
call that outlives `tool_timeout` becomes an `{"error": ...}` result the model reads, and counts
as a failure (`tools/failure_frequency`), exactly where TRL's tool loop counts them.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram_grpo.config import ConfigError
from lowvram_grpo.errors import one_line
from lowvram_grpo.stopping import CallTimedOut, StepInterrupted, call_with_deadline
from lowvram_grpo.user_code import UserFileError, import_user_file

PYTHON_TOOL = "python"
# What the python tool hands back at most: a tool result is read by the model, token by token,
# inside max_completion_length.
PYTHON_OUTPUT_CHARS = 2000


# --- loading ---------------------------------------------------------------------------------


def load_object(spec: str, key: str) -> Any:
    """The object `spec` names: `path/to/file.py:name` or `package.module.name`. Errors are
    ConfigErrors naming `key`."""
    source, sep, attr = spec.rpartition(":")
    if sep:
        module = _import_file(Path(source).expanduser(), spec, key)
    else:
        module_name, dot, attr = spec.rpartition(".")
        if not dot:
            raise ConfigError(f"{key}: '{spec}' is neither a built-in nor 'path/to/file.py:name' nor "
                              "'package.module.name'")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            raise ConfigError(f"{key}: '{spec}': cannot import module '{module_name}' ({one_line(err)}); install "
                              "it, add its folder to PYTHONPATH, or use 'path/to/file.py:name'") from None
    if not hasattr(module, attr):
        own = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                     and getattr(v, "__module__", None) == module.__name__)
        close = difflib.get_close_matches(attr, own, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{key}: '{spec}': {module.__name__} has no '{attr}'; {hint}it defines: "
                          f"{', '.join(own) or 'nothing callable'}")
    return getattr(module, attr)


def _import_file(path: Path, spec: str, key: str):
    try:
        return import_user_file(path)
    except UserFileError as err:
        raise ConfigError(f"{key}: '{spec}': {err}") from None


def tool_schema(fn: Callable, key: str = "tools") -> dict:
    """The JSON schema the chat template shows the model (transformers' get_json_schema, as TRL
    and apply_chat_template(tools=[fn]) make it); a ConfigError naming `key` if the function
    lacks what the schema is built from."""
    from transformers.utils import get_json_schema

    name = getattr(fn, "__name__", repr(fn))
    try:
        return get_json_schema(fn)
    except Exception as err:
        raise ConfigError(
            f"{key}: '{name}' cannot be described to the model ({one_line(err)}); give every argument a type "
            "hint and write a Google-style docstring: a summary line, then 'Args:' with one line per argument"
        ) from None


def python_tool(timeout_s: float = 10.0, memory_mb: int = 512) -> Callable:
    """The built-in `python` tool: runs the model's program in the code sandbox (the limits of
    code_tests) and returns what it printed; a program that fails raises, so the model sees an
    error result and the call counts as a failure."""
    from lowvram_grpo.rewards.sandbox import SandboxLimits, run_program

    limits = SandboxLimits(wall_seconds=timeout_s, cpu_seconds=max(1, math.ceil(timeout_s)),
                           memory_bytes=memory_mb * 2**20)

    def python(code: str) -> str:
        """Run a Python program and return what it prints.

        Args:
            code: A complete Python program; print the values you want to see.
        """
        result = run_program({"main.py": code}, ["main.py"], limits=limits)
        if result.timed_out:
            raise TimeoutError(f"the program ran longer than {timeout_s:g} s")
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                               else f"the program exited with code {result.returncode}")
        return result.stdout[-PYTHON_OUTPUT_CHARS:]

    return python


def load_tools(specs: list[str], config=None) -> list[Callable]:
    """The configured tools, checked (callable, describable, distinct names). `config` gives the
    python tool its sandbox limits (code_timeout_s, code_memory_mb)."""
    tools = []
    for spec in specs:
        if spec == PYTHON_TOOL:
            fn = python_tool(config.code_timeout_s, config.code_memory_mb) if config is not None else python_tool()
        else:
            fn = load_object(spec, "tools")
            if not callable(fn) or inspect.isclass(fn):
                raise ConfigError(f"tools: '{spec}' is a {type(fn).__name__}, not a function")
        tool_schema(fn)
        tools.append(fn)
    _check_distinct_names(tools, "tools")
    return tools


def _check_distinct_names(tools: list[Callable], key: str) -> None:
    names = [t.__name__ for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{key}: two tools are named {', '.join(twice)}; the model calls tools by name, so "
                          "rename one")


# --- environments ----------------------------------------------------------------------------


ENVIRONMENT_HOOKS = ("reset", "get_reward")


def environment_methods(instance: Any) -> list[Callable]:
    """An environment instance's tools: its public methods but reset and get_reward (listed on
    the class, as TRL does, so that properties are not evaluated)."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if name not in ENVIRONMENT_HOOKS and not name.startswith("_")]


def load_environment(spec: str) -> type:
    """The environment class `spec` names, checked on one probe instance: it has reset(), and its
    methods can be described to the model."""
    factory = load_object(spec, "environment_factory")
    if not callable(factory):
        raise ConfigError(f"environment_factory: '{spec}' is a {type(factory).__name__}, not a class")
    try:
        probe = factory()
    except Exception as err:
        raise ConfigError(f"environment_factory: '{spec}()' failed: {one_line(err)}") from None
    if not callable(getattr(probe, "reset", None)):
        raise ConfigError(f"environment_factory: '{spec}' has no reset(**row) method; add one that starts an "
                          "episode for a dataset row and returns text for the prompt (or None)")
    for method in environment_methods(probe):
        tool_schema(method, "environment_factory")
    return factory


# --- running calls ---------------------------------------------------------------------------


@dataclass
class ToolCounts:
    """What one trajectory did with its tools (summed up for the step's tools/* metrics)."""

    turns: int = 0  # the model's turns
    calls: int = 0
    failures: int = 0
    per_tool: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, failed: bool) -> None:
        self.calls += 1
        self.failures += int(failed)
        self.per_tool[name] = self.per_tool.get(name, 0) + 1


@dataclass
class ToolBox:
    """The tools one rollout may call, by name, each call limited to `timeout` seconds. Once
    `should_stop()` is true a running call is abandoned and StepInterrupted raised: a stop
    request never waits on a slow tool."""

    tools: list[Callable]
    timeout: float | None = None
    should_stop: Callable[[], bool] | None = None

    def run(self, tool_calls: list[dict], counts: ToolCounts) -> list[dict]:
        """One assistant turn's tool calls -> the tool messages that answer them.

        As TRL's tool loop: plain functions run one after the other, `async def` ones together,
        and their results follow the plain ones'. A result is the function's return value as
        text (a list of content parts stays a list); a failure is `{"error": ...}`."""
        by_name = {t.__name__: t for t in self.tools}
        results, pending = [], []
        for call in tool_calls:
            if call.get("type") != "function":
                name = call.get("name", "unknown")
                results.append((name, {"error": f"Unsupported tool call type: {call.get('type')}"}, True))
                continue
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            fn = by_name.get(name)
            if fn is not None and inspect.iscoroutinefunction(fn):
                pending.append((name, fn, arguments))
            else:
                results.append((name, *self._call(name, fn, arguments)))
        if pending:
            results += [(name, *outcome) for (name, _, _), outcome in zip(pending, self._call_async(pending))]
        messages = []
        for name, result, failed in results:
            counts.add(name, failed)
            messages.append({"role": "tool", "name": name,
                             "content": result if isinstance(result, list) else str(result)})
        return messages

    def _call(self, name: str, fn: Callable | None, arguments: Any) -> tuple[Any, bool]:
        try:
            if fn is None:
                raise ValueError(f"Tool {name} not found.")
            return call_with_deadline(lambda: fn(**arguments), self.timeout, self.should_stop), False
        except StepInterrupted:
            raise
        except CallTimedOut:
            return {"error": self._timeout_message(name)}, True
        except Exception as err:
            return {"error": str(err)}, True

    def _call_async(self, pending: list[tuple[str, Callable, Any]]) -> list[tuple[Any, bool]]:
        from lowvram_grpo.rewards.scoring import _event_loop  # the one loop async user code runs on

        async def one(name: str, fn: Callable, arguments: Any) -> tuple[Any, bool]:
            try:
                return await asyncio.wait_for(fn(**arguments), self.timeout), False
            except asyncio.TimeoutError:
                return {"error": self._timeout_message(name)}, True
            except Exception as err:
                return {"error": str(err)}, True

        async def gather():
            return await asyncio.gather(*(one(*p) for p in pending))

        future = asyncio.run_coroutine_threadsafe(gather(), _event_loop())
        try:  # each call has its own timeout (in `one`); here only a stop request is watched for
            return call_with_deadline(future.result, None, self.should_stop)
        except StepInterrupted:
            future.cancel()
            raise

    def _timeout_message(self, name: str) -> str:
        return f"tool {name} did not return within {self.timeout:g} seconds (tool_timeout)"
