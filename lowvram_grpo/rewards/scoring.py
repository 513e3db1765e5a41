"""Scoring a batch of completions with every reward function, weighted and summed.

Exactly as TRL 1.16's `_calculate_rewards`, functions also get `trainer_state` (a
transformers `TrainerState`: `global_step`, `max_steps`, `epoch`, for rewards that change
over training), `log_metric(name, value)` (the step's mean lands in metrics.jsonl) and
`log_extra(column, values)` (one value per completion, shown with the sampled completions in
completions.jsonl). `async def` functions run concurrently with each other on one event loop
that lives for the whole run (so clients they create stay usable), as TRL runs them.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowvram_grpo.errors import one_line
from lowvram_grpo.rewards.base import TRAINER_KEYWORDS, RewardFunction, RewardFunctionError
from lowvram_grpo.stopping import CallTimedOut, StepInterrupted, call_with_deadline


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

    def select(self, rows: list[int]) -> RewardScores:
        """These completions' scores (and extra columns); logged metrics stay whole."""
        index = torch.tensor(rows, dtype=torch.long)
        return RewardScores(self.names, self.per_function[index], self.total[index], self.logged,
                            {k: [v[i] for i in rows] for k, v in self.extra.items()})

    @staticmethod
    def concat(parts: list[RewardScores]) -> RewardScores:
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
               should_stop: Callable[[], bool] | None = None, trainer_state: Any = None,
               completion_messages: list[list[dict]] | None = None,
               extra_columns: dict[str, list] | None = None) -> RewardScores:
    """Score `num_generations` completions per dataset row (a row's completions contiguous):
    each completion is paired with its row's prompt and other columns, and conversational
    prompts get TRL's conversational completion form. Multi-turn rollouts pass their
    trajectories as `completion_messages` (assistant turns, tool calls, tool results), which
    reward functions then receive as the completions, and `extra_columns` with one value per
    completion (each rollout's `environments`, a rollout_func's extra fields), as TRL passes
    them. See score_completions for `should_stop` and `trainer_state`."""
    prompts = [row["prompt"] for row in rows for _ in range(num_generations)]
    if completion_messages is not None:
        completions = completion_messages
    elif isinstance(prompts[0], list):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    columns = {key: [row.get(key) for row in rows for _ in range(num_generations)]
               for key in rows[0] if key != "prompt"}
    columns.update(extra_columns or {})
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
