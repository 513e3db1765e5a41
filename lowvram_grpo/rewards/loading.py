"""Reward names in the config resolved to functions, and their `args` bound.

`resolve_reward` takes a built-in name (`BUILTIN_REWARDS`, `code_tests` among them),
`model:<hub id or dir>` (a reward model, see reward_model.py), `judge:self` or `judge:<URL>`
(an LLM judge, see judges.py), `path/to/file.py:function`, or a dotted import path
`pkg.module.function`. The kinds beyond rules take their settings (limits, batch sizes, the
judge's prompt) from a `RewardContext`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable

from lowvram_grpo.config import RewardSpec
from lowvram_grpo.errors import one_line
from lowvram_grpo.rewards.base import RewardContext, RewardFunction, RewardFunctionError
from lowvram_grpo.rewards.builtins import BUILTIN_REWARDS, check_builtin_args, overlong_penalty
from lowvram_grpo.rewards.code import code_tests_from_config
from lowvram_grpo.user_code import UserFileError, import_user_file


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
        return code_tests_from_config(context.config)
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if name.startswith("model:"):
        from lowvram_grpo.rewards.reward_model import reward_model

        return reward_model(name.removeprefix("model:"), context)
    if name.startswith("judge:"):
        from lowvram_grpo.rewards.judges import judge

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
    try:
        return import_user_file(source)
    except UserFileError as err:
        raise RewardFunctionError(f"reward '{spec}': {err}") from err.__cause__


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
        if isinstance(spec.name, str) and spec.name in BUILTIN_REWARDS:
            check_builtin_args(spec.name, args)
        if args:
            fn = functools.partial(fn, **args)
        base = spec.name if isinstance(spec.name, str) and spec.name in BUILTIN_REWARDS else _function_name(fn)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        loaded.append(RewardFunction(name=name, fn=fn, weight=float(spec.weight), timeout=timeout))
    return loaded


