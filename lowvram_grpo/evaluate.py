"""Evaluation: greedy completions on held-out prompts, scored with the run's reward functions.

`evaluate` is the building block: one greedy completion per prompt (no sampling, so two runs on
the same prompts give the same numbers), scored with the same reward functions as training,
reported as `eval/*` metrics. The trainer calls it every `eval_every` steps; `compare` runs it
twice on one loaded model, adapter off (the base model) and adapter on, which is what
`lowvram-grpo eval` prints.

Metrics (all floats):
    eval/reward                     mean weighted reward, as in training (`reward`)
    eval/rewards/<name>/mean        mean of each reward function (not-applicable rows left out)
    eval/accuracy                   only when an answer reward is configured (see below)
    eval/completions/mean_length    mean completion length in tokens
    eval/completions/clipped_ratio  fraction cut off by max_completion_length
    eval/num_prompts                how many prompts were evaluated

Accuracy is deliberately simple: the first answer reward in the config (arith_answer,
exact_answer, numeric_answer or math_answer: those score 1.0 for a right answer and 0.0 for a
wrong one) is taken, and accuracy is the fraction of prompts where it scored exactly 1.0, among
the prompts it applies to (rows whose reference answer is missing are left out). Without an answer reward
there is no notion of "right", so `eval/accuracy` is omitted rather than guessed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lowvram_grpo import distributed, vision
from lowvram_grpo.agent.loop import Agent, generate_tool_rollouts, refuse_images
from lowvram_grpo.config import AUTO, TrainConfig
from lowvram_grpo.data import load_prompt_data
from lowvram_grpo.model import default_device, load_policy, reference_model, resolve_model_path
from lowvram_grpo.rewards.base import RewardContext, RewardFunction
from lowvram_grpo.rewards.builtins import BUILTIN_REWARDS
from lowvram_grpo.rewards.loading import load_reward_functions
from lowvram_grpo.rewards.scoring import score_rows
from lowvram_grpo.rollout import generate_greedy

# Built-in rewards that mean "the answer is right" (1.0) or "wrong" (0.0).
ANSWER_REWARDS = ("arith_answer", "exact_answer", "numeric_answer", "math_answer")

# Prompts decoded at once when generation_chunk_size is "auto": one answer each, so far less
# than a training step's generation chunk.
AUTO_EVAL_CHUNK_SIZE = 8

# Prompts evaluated when there is no eval split and --max-prompts is not given.
DEFAULT_FALLBACK_PROMPTS = 100


def evaluate(policy, tokenizer, rows: list[dict], reward_functions: list[RewardFunction] | None,
             config: TrainConfig, max_prompts: int | None = None, adapter: bool = True,
             completions: list[str] | None = None) -> dict[str, float]:
    """Greedy-decode one completion per prompt of `rows` and score it; returns `eval/*` metrics.

    Args:
        policy: the peft model (as from `load_policy`).
        rows: prompt rows as `load_prompt_data` returns them (`prompt` plus dataset columns).
        reward_functions: loaded reward functions; None loads `config.rewards`.
        config: generation limits (`max_prompt_length`, `max_completion_length`) and the
            chunk size (`generation_chunk_size` prompts are generated at a time).
        max_prompts: evaluate only the first N rows.
        adapter: False evaluates the base model (adapter disabled), True the trained policy.
        completions: a list that receives each prompt's greedy completion (this process's
            prompts only, when several processes share the work), to show examples.

    The policy is left in the train/eval mode it was in, with its adapter enabled.
    """
    rows = list(rows)[:max_prompts] if max_prompts else list(rows)
    if not rows:
        raise ValueError("evaluate: no prompts to evaluate (the eval split is empty)")
    if reward_functions is None:
        reward_functions = load_reward_functions(config.rewards, RewardContext(config, policy, tokenizer))
    if not adapter:
        with reference_model(policy):
            return evaluate(policy, tokenizer, rows, reward_functions, config, adapter=True, completions=completions)

    # With several processes (see distributed.py) each decodes every W-th prompt and the
    # per-prompt results are gathered: the metrics are one process's, in 1/W of the time.
    texts, *scores = _greedy_scores(policy, tokenizer, distributed.strided_share(rows), reward_functions, config)
    total, per_function, lengths, clipped = (distributed.all_gather_tensor(t) for t in scores)
    if completions is not None:
        completions.extend(texts)

    result = {"eval/reward": _nanmean(total)}
    for i, reward in enumerate(reward_functions):
        result[f"eval/rewards/{reward.name}/mean"] = _nanmean(per_function[:, i])
    column = _answer_reward_column(reward_functions)
    if column is not None:
        values = per_function[:, column]
        values = values[~torch.isnan(values)]
        result["eval/accuracy"] = float((values == 1.0).float().mean()) if len(values) else float("nan")
    result.update({
        "eval/completions/mean_length": float(lengths.mean()),
        "eval/completions/clipped_ratio": float(clipped.float().mean()),
        "eval/num_prompts": float(len(rows)),
    })
    return result


def _greedy_scores(policy, tokenizer, rows: list[dict], reward_functions: list[RewardFunction],
                   config: TrainConfig) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt: the completion, total reward, each function's reward, completion length,
    clipped or not."""
    if not rows:  # a process with no share still takes part in the gathers
        return ([], torch.empty(0), torch.empty(0, len(reward_functions)), torch.empty(0),
                torch.empty(0, dtype=torch.bool))
    # Greedy: one completion per prompt is enough, and the result is deterministic.
    # (Generation leaves the policy in the train/eval mode it found it in.)
    chunk = config.generation_chunk_size if config.generation_chunk_size != AUTO else AUTO_EVAL_CHUNK_SIZE
    agent = Agent.from_config(config)
    extra_columns = {}
    if agent is None:
        rollout = generate_greedy(policy, tokenizer, [vision.model_prompt(row) for row in rows], chunk_size=chunk,
                                  max_prompt_length=config.max_prompt_length,
                                  max_new_tokens=config.max_completion_length)
    else:  # with tools: greedy trajectories, tool results and all, as training rolls them out
        refuse_images(config, rows)
        agent.prepare(tokenizer)
        prompts, toolboxes, environments = agent.start(rows, num_generations=1)
        rollout = generate_tool_rollouts(
            policy, tokenizer, prompts, toolboxes, num_generations=1, chunk_size=chunk,
            max_prompt_length=config.max_prompt_length, max_completion_length=config.max_completion_length,
            max_iterations=agent.max_iterations, do_sample=False)
        extra_columns = {"environments": environments} if environments is not None else {}
    scores = score_rows(reward_functions, rows, rollout.completions, rollout.completion_token_lists(),
                        completion_messages=rollout.completion_messages, extra_columns=extra_columns)
    return (rollout.completions, scores.total, scores.per_function, rollout.loss_mask.sum(1).float(),
            rollout.is_clipped)


def compare(config: TrainConfig, adapter_path: str | Path, max_prompts: int | None = None,
            log: Callable[[str], None] | None = None,
            examples: list[dict] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Evaluate the base model and base + adapter on the eval split: returns (before, after).

    The model is loaded once, with the adapter from `adapter_path`; "before" is the same weights
    with the adapter disabled, so both use exactly the same (possibly 4-bit) base. Prompts are
    the eval split (`eval_fraction` or `eval_dataset`); without one, the first `max_prompts`
    (default 100) training prompts, and `log` says so, since the adapter may have trained on
    them. `log` receives progress notes (default: printed to stderr). `examples`, when given,
    receives one {"prompt", "answer", "base", "adapter"} per prompt: the two greedy completions.
    """
    from lowvram_grpo.export import read_adapter_config

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    adapter_config = read_adapter_config(adapter_path)
    _warn_if_other_base(adapter_config.get("base_model_name_or_path"), config, log)
    config = dataclasses.replace(config, adapter_path=str(adapter_path))

    device = default_device()
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    policy, tokenizer = load_policy(config, device, inference_only=True)
    data = load_prompt_data(config, tokenizer)
    if data.eval:
        rows = data.eval[:max_prompts] if max_prompts else data.eval
        log(f"evaluating {len(rows)} held-out prompts ({data.source})")
    else:
        rows = data.train[:max_prompts or DEFAULT_FALLBACK_PROMPTS]
        log(f"note: no eval split (set eval_fraction or eval_dataset), so evaluating the first "
            f"{len(rows)} training prompts, which the adapter may have trained on")
    reward_functions = load_reward_functions(config.rewards, RewardContext(config, policy, tokenizer))
    base, tuned = [], []
    before = evaluate(policy, tokenizer, rows, reward_functions, config, adapter=False, completions=base)
    after = evaluate(policy, tokenizer, rows, reward_functions, config, adapter=True, completions=tuned)
    if examples is not None:
        examples.extend({"prompt": row["prompt"], "answer": row.get("answer"), "base": b, "adapter": a}
                        for row, b, a in zip(distributed.strided_share(rows), base, tuned))
    return before, after


def comparison_rows(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(metric, base, adapter, delta) per metric, without the `eval/` prefix and the prompt count."""
    return [(key.removeprefix("eval/"), before.get(key, float("nan")), after[key],
             after[key] - before.get(key, float("nan"))) for key in after if key != "eval/num_prompts"]


def format_comparison(before: dict[str, float], after: dict[str, float]) -> str:
    """A small text table: metric, base, adapter, delta (one row per metric, counts left out)."""
    rows = [("metric", "base", "adapter", "delta")]
    rows += [(name, f"{b:.4f}", f"{a:.4f}", f"{d:+.4f}") for name, b, a, d in comparison_rows(before, after)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [row[0].ljust(widths[0]) + "  " + "  ".join(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))
             for row in rows]
    return "\n".join(lines)


def _answer_reward_column(reward_functions: list[RewardFunction]) -> int | None:
    """Index of the first answer reward (by built-in name, or the built-in function itself)."""
    answer_fns = [BUILTIN_REWARDS[name] for name in ANSWER_REWARDS if name in BUILTIN_REWARDS]
    for i, reward in enumerate(reward_functions):
        if reward.name in ANSWER_REWARDS or any(reward.fn is fn for fn in answer_fns):
            return i
    return None


def _nanmean(values: torch.Tensor) -> float:
    return float(torch.nanmean(values.float())) if values.numel() else float("nan")


def _warn_if_other_base(adapter_base: str | None, config: TrainConfig, log: Callable[[str], None]) -> None:
    """An adapter on the wrong base model either fails to load or silently evaluates nonsense."""
    if not adapter_base:
        return
    expected = resolve_model_path(config.model_name_or_path)
    same = adapter_base == expected or (
        Path(adapter_base).is_dir() and Path(expected).is_dir()
        and Path(adapter_base).resolve() == Path(expected).resolve())
    # The built-in tiny model's adapters record a cache path that differs between machines.
    if not same and not config.model_name_or_path.startswith("builtin:"):
        log(f"warning: the adapter was trained on '{adapter_base}' but the config's model is "
            f"'{config.model_name_or_path}'; pass the run's own config (or model=...) if that is wrong")
