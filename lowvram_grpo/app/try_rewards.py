"""The "Try rewards" tab: see the rewards and group advantages GRPO would give, before any GPU
time is spent on training. Either for completions a user pastes (`score_group`), or for the
base model's own completions of the dataset's first rows (`BaseSampler`), sampled as the first
training step would sample them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lowvram_grpo import vision
from lowvram_grpo.app.use_adapter import ModelSlot, load_for_inference
from lowvram_grpo.config import RewardSpec, TrainConfig

SEPARATOR = "---"  # a line of its own between pasted completions
MAX_SAMPLE_ROWS = 8  # rows sampled at once: G completions each, on the app's own process


def split_completions(text: str) -> list[str]:
    """Completions pasted one after another, separated by lines of `---`."""
    parts, current = [], []
    for line in (text or "").split("\n"):
        if line.strip() == SEPARATOR:
            parts.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    parts.append("\n".join(current).strip("\n"))
    return [p for p in parts if p.strip()]


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def _score_columns(functions, rows: list[dict], completions: list[str], completion_ids, num_generations: int,
                   aggregation: str, scale_rewards: str, completion_messages: list | None = None,
                   extra_columns: dict | None = None) -> tuple[list[str], list[list[Any]], Any, torch.Tensor]:
    """Score `num_generations` completions per row as training does (the same reward calls, the
    same advantages; multi-turn ones as trajectories). Returns the columns [*functions, total,
    advantage], one row of them per completion, the RewardScores and the advantages."""
    from lowvram_grpo.grpo import step_advantages
    from lowvram_grpo.rewards.scoring import score_rows

    scores = score_rows(functions, rows, completions, completion_ids, num_generations=num_generations,
                        completion_messages=completion_messages, extra_columns=extra_columns)
    weights = torch.tensor([f.weight for f in functions], dtype=torch.float32)
    advantages, _ = step_advantages(scores.per_function, scores.total, weights, num_generations, aggregation,
                                    scale_rewards)
    table = [[*(_rounded(float(v)) for v in scores.per_function[i]), _rounded(float(scores.total[i])),
              round(float(advantages[i]), 4)] for i in range(len(completions))]
    return [*scores.names, "total", "advantage"], table, scores, advantages


def score_group(rewards: list[RewardSpec], row: dict[str, Any], completions: list[str],
                scale_rewards: str = "group") -> tuple[list[str], list[list[Any]]]:
    """Each completion's per-function rewards, weighted total and group advantage, scored as one
    group for the dataset `row` (its prompt and columns such as the answer). Returns the column
    names and one row per completion. A failing reward function raises RewardFunctionError."""
    from lowvram_grpo.rewards.loading import load_reward_functions

    if not completions:
        raise ValueError("paste at least one completion (separate several with a line of ---)")
    columns, table, _, _ = _score_columns(load_reward_functions(rewards), [row], completions, None,
                                          len(completions), "sum_then_normalize", scale_rewards)
    return ["completion", *columns], [[text, *values] for text, values in zip(completions, table)]


@dataclass
class SampledGroups:
    """The base model's groups for the dataset's first rows, scored: what the page shows."""

    columns: list[str]
    table: list[list[Any]]  # one row per completion, a prompt's G completions together
    num_rows: int
    num_generations: int
    mean_reward: float
    zero_std_groups: int  # groups whose completions all got the same reward: no learning signal


class BaseSampler:
    """The form's model without any adapter, sampling `num_generations` completions for each
    of the dataset's first rows with the run's generation settings, scored with its reward
    functions. The model stays loaded (in the app's ModelSlot) for the next click."""

    def __init__(self, models: ModelSlot):
        self.models = models

    def sample(self, config: TrainConfig, num_rows: int) -> SampledGroups:
        from lowvram_grpo.agent.loop import Agent, generate_tool_rollouts, refuse_images
        from lowvram_grpo.app.dashboard import trajectory_text
        from lowvram_grpo.data import read_prompt_rows
        from lowvram_grpo.model import default_device, reference_model
        from lowvram_grpo.planning.planner import resolve_chunking
        from lowvram_grpo.rewards.base import RewardContext, completion_text
        from lowvram_grpo.rewards.loading import load_reward_functions
        from lowvram_grpo.rollout import generate_rollouts

        check_num_rows(num_rows)
        # The dataset and the reward functions first: a mistake there shows before the model loads.
        rows = read_prompt_rows(config).train[:num_rows]
        context = RewardContext(config)
        functions = load_reward_functions(config.rewards, context, timeout=config.reward_timeout)
        agent = Agent.from_config(config)  # tools, an environment: multi-turn groups, as training rolls them out
        if agent is not None:
            functions += agent.reward_functions(config.reward_timeout)
            refuse_images(config, rows)
        device = default_device()
        chunk_size = resolve_chunking(config, device, announce=False).generation_chunk_size
        G = config.num_generations
        with self.models.lock:
            policy, tokenizer = self.models.get(_base_key(config), lambda: _load_base(config))
            context.policy, context.tokenizer = policy, tokenizer  # for judge:self
            extra_columns = {}
            with reference_model(policy):  # the base model exactly, whatever LoRA the slot's model has
                if agent is None:
                    rollout = generate_rollouts(
                        policy, tokenizer, [vision.model_prompt(row) for row in rows], num_generations=G,
                        chunk_size=chunk_size, max_prompt_length=config.max_prompt_length,
                        max_completion_length=config.max_completion_length, temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k)
                else:
                    agent.prepare(tokenizer)
                    prompts, toolboxes, environments = agent.start(rows, G)
                    rollout = generate_tool_rollouts(
                        policy, tokenizer, prompts, toolboxes, num_generations=G, chunk_size=chunk_size,
                        max_prompt_length=config.max_prompt_length,
                        max_completion_length=config.max_completion_length, max_iterations=agent.max_iterations,
                        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
                    extra_columns = {"environments": environments} if environments is not None else {}
            columns, values, scores, _ = _score_columns(
                functions, rows, rollout.completions, rollout.completion_token_lists(), G,
                config.multi_objective_aggregation, config.scale_rewards, rollout.completion_messages, extra_columns)

        with_answer = any(row.get("answer") is not None for row in rows)
        table = []
        for i, completion in enumerate(rollout.completions):
            if rollout.completion_messages is not None:  # the whole trajectory, turn by turn
                completion = trajectory_text(rollout.completion_messages[i])
            row = rows[i // G]
            shown = [i // G + 1, completion_text(row["prompt"])] + ([_text(row.get("answer"))] if with_answer else [])
            table.append([*shown, completion, *values[i]])
        # Highest minus lowest reward of each group, leaving out unscorable completions (NaN).
        groups = scores.total.view(-1, G)
        unscored = groups.isnan()
        spread = (groups.masked_fill(unscored, -math.inf).max(1).values
                  - groups.masked_fill(unscored, math.inf).min(1).values)
        return SampledGroups(
            columns=["row", "prompt", *(["answer"] if with_answer else []), "completion", *columns],
            table=table, num_rows=len(rows), num_generations=G,
            mean_reward=float(torch.nanmean(scores.total)), zero_std_groups=int((spread < 1e-6).sum()))


def check_num_rows(num_rows: int) -> None:
    if not 1 <= num_rows <= MAX_SAMPLE_ROWS:
        raise ValueError(f"rows: give 1 to {MAX_SAMPLE_ROWS} (each row gets G completions)")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _base_key(config: TrainConfig) -> tuple:
    """What decides the loaded base model (the LoRA settings do not: the adapter is off)."""
    from lowvram_grpo.model import resolve_model_path

    # Tools change the tokenizer (their schemas in every prompt, a response parser): their own slot.
    return ("base", resolve_model_path(config.model_name_or_path), config.quantization, config.dtype,
            config.trust_remote_code, repr(config.chat_template_kwargs), repr(config.tools),
            config.environment_factory)


def _load_base(config: TrainConfig):
    from dataclasses import replace

    return load_for_inference(replace(config, adapter_path=None))  # a fresh LoRA, kept off
