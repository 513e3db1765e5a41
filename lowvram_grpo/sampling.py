"""Sampling a step's groups: which prompts (a seeded order, epoch after epoch), G completions
each with the adapter on (plain or multi-turn with tools), and their rewards; with dynamic
sampling (DAPO), more rounds of fresh prompts until the step has enough groups whose rewards
differ (the only ones that carry a policy gradient).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lowvram_grpo import distributed, grpo, metrics, vision
from lowvram_grpo.agent.loop import call_rollout_func, generate_tool_rollouts
from lowvram_grpo.config import TrainConfig
from lowvram_grpo.planning.backoff import retry_on_oom
from lowvram_grpo.planning.chunking import GENERATION
from lowvram_grpo.rewards.scoring import RewardScores, score_rows
from lowvram_grpo.rollout import concat_rollouts, generate_rollouts

if TYPE_CHECKING:  # annotations only: the trainer builds the Learner and calls this module
    from lowvram_grpo.trainer import Learner


class PromptSampler:
    """Walks the training prompts in a seeded random order, epoch after epoch.

    Its whole state is (epoch, position), saved in checkpoints, so a resumed run sees exactly
    the prompts an uninterrupted run would have seen.
    """

    def __init__(self, num_rows: int, seed: int, epoch: int = 0, position: int = 0):
        self.num_rows, self.seed, self.epoch, self.position = num_rows, seed, epoch, position

    def _order(self) -> list[int]:
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_indices(self, count: int) -> list[int]:
        indices, order = [], self._order()
        while len(indices) < count:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            indices.append(order[self.position])
            self.position += 1
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def _sample_groups(learner: Learner, rows: list[dict], sampler: PromptSampler, trainer_state,
                   oom_events: list[str], should_stop: Callable[[], bool] | None):
    """Steps 1-3: the next `prompts_per_step` prompts (this process's share of them), G
    completions each with the adapter on, and their rewards. Returns (rows, rollout, scores,
    generation seconds)."""
    config, chunking = learner.config, learner.chunking
    started = time.perf_counter()
    # Every process draws the same list and takes its own share of whole prompts.
    batch = [rows[i] for i in distributed.local_share(sampler.next_indices(config.prompts_per_step))]
    # Each memory-heavy phase runs under retry_on_oom: on an out-of-memory error it halves the
    # chunk size that bounds the phase (in `chunking`) and runs the phase again.
    extra_columns: dict[str, list] = {}
    with learner.on_phase(GENERATION):
        if learner.agent is None:
            rollout = retry_on_oom(GENERATION, chunking, lambda sizes: generate_rollouts(
                learner.policy, learner.tokenizer, [vision.model_prompt(row) for row in batch],
                num_generations=config.num_generations, chunk_size=sizes.generation_chunk_size,
                max_prompt_length=config.max_prompt_length, max_completion_length=config.max_completion_length,
                temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, should_stop=should_stop),
                oom_events, hint=_kv_cache_hint(learner))
        else:
            rollout, extra_columns = retry_on_oom(GENERATION, chunking, lambda sizes: _tool_rollouts(
                learner, batch, sizes.generation_chunk_size, should_stop), oom_events, hint=_kv_cache_hint(learner))
    generation_time = time.perf_counter() - started
    # TRL's calling convention, one entry per completion (with tools: the trajectory as messages,
    # and each rollout's environment or a rollout_func's extra fields).
    scores = score_rows(learner.reward_functions, batch, rollout.completions, rollout.completion_token_lists(),
                        config.num_generations, should_stop=should_stop, trainer_state=trainer_state,
                        completion_messages=rollout.completion_messages, extra_columns=extra_columns)
    return batch, rollout, scores, generation_time


def _tool_rollouts(learner: Learner, batch: list[dict], chunk_size: int, should_stop: Callable[[], bool] | None):
    """Multi-turn rollouts of `batch` with the run's tools (or its rollout_func), `chunk_size`
    sequences generated at a time, and the extra columns rewards get with them: each rollout's
    environment, or what rollout_func returned.
    Every attempt starts fresh episodes: after an out-of-memory retry (a smaller chunk), no
    trajectory continues from a half-played one, and no step is lost or counted twice."""
    config, agent = learner.config, learner.agent
    if agent.rollout_func is not None:
        return call_rollout_func(agent.rollout_func, learner, batch)
    prompts, toolboxes, environments = agent.start(batch, config.num_generations, should_stop)
    rollout = generate_tool_rollouts(
        learner.policy, learner.tokenizer, prompts, toolboxes, num_generations=config.num_generations,
        chunk_size=chunk_size, max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_completion_length, max_iterations=agent.max_iterations,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, should_stop=should_stop)
    return rollout, {"environments": environments} if environments is not None else {}


def _kv_cache_hint(learner: Learner) -> str:
    """What one sequence's KV cache takes at the run's longest length (for the out-of-memory message)."""
    config = learner.config
    length = config.max_prompt_length + config.max_completion_length
    per_token = metrics.kv_cache_bytes_per_token(learner.policy, length)
    if per_token is None:
        return ""
    return (f"one sequence's KV cache at {length} tokens takes ~{per_token * length / 2**30:.1f} GB "
            f"({per_token / 1024:.0f} KB per token)")


def _informative_groups(scores: RewardScores, num_generations: int, aggregation: str) -> torch.Tensor:
    """(groups,) True where the group's advantages are not all zero, i.e. where it carries a
    policy gradient. Summing first, that is where the summed rewards differ (TRL's nonzero
    std); normalising each function first, where some function's rewards differ. A group with
    fewer than two scorable completions has no spread either."""
    values = scores.per_function if aggregation == "normalize_then_sum" else scores.total.unsqueeze(1)
    std = grpo._nanstd(values.view(-1, num_generations, values.size(1)), dim=1)  # (groups, columns)
    return (~torch.isnan(std) & ~torch.isclose(std, torch.zeros_like(std))).any(dim=1)


def _informative_sequence_indices(scores: RewardScores, num_generations: int, aggregation: str) -> list[int]:
    """The indices of the sequences (completions) of the groups that carry a policy gradient."""
    groups = _informative_groups(scores, num_generations, aggregation).nonzero().flatten().tolist()
    return [g * num_generations + j for g in groups for j in range(num_generations)]


def _resample_until_informative(config: TrainConfig, first_round, sample_round, pad_id: int):
    """DAPO's dynamic sampling: generate for fresh prompts until the step has `prompts_per_step`
    informative groups (or `max_resample_rounds` extra rounds have run), and keep the first
    `prompts_per_step` of them in the order they were drawn, on every process the same choice
    (every process sees every group's flag). Returns the kept (rows, rollout, scores) and the
    dynamic-sampling metrics."""
    G, world = config.num_generations, distributed.world()
    rounds, flags = [first_round], []

    def global_flags(scores: RewardScores) -> torch.Tensor:  # every process's groups, in prompt order
        return _informative_groups(_gather_scores(scores), G, config.multi_objective_aggregation)

    flags.append(global_flags(first_round[2]))
    while sum(int(f.sum()) for f in flags) < config.prompts_per_step and len(rounds) <= config.max_resample_rounds:
        rounds.append(sample_round())
        flags.append(global_flags(rounds[-1][2]))

    # The first prompts_per_step informative groups in the order drawn; if there are not that
    # many, the step is filled up with the first uninformative ones (the update skips those).
    drawn = [(r, g) for r, round_flags in enumerate(flags) for g in range(len(round_flags))]
    informative = [(r, g) for r, g in drawn if flags[r][g]][:config.prompts_per_step]
    filler = [(r, g) for r, g in drawn if not flags[r][g]][:config.prompts_per_step - len(informative)]
    chosen = set(informative + filler)
    # This process holds groups [offset, offset + local) of each round (local_share of prompts).
    local = config.prompts_per_step // world.world_size
    offset = world.rank * local
    kept_rows, kept_rollouts, kept_scores = [], [], []
    for r, (batch, rollout, scores, _) in enumerate(rounds):
        mine = [g - offset for g in range(offset, offset + local) if (r, g) in chosen]
        sequence_indices = [g * G + j for g in mine for j in range(G)]
        kept_rows += [batch[g] for g in mine]
        kept_rollouts.append(rollout.select(sequence_indices))
        kept_scores.append(scores.select(sequence_indices))
    generated = distributed.all_reduce_sum(sum(float(r[1].loss_mask.sum()) for r in rounds))
    dynamic = {"dynamic_sampling/resample_rounds": len(rounds) - 1,
               "dynamic_sampling/resampled_groups": (len(rounds) - 1) * config.prompts_per_step,
               "dynamic_sampling/informative_groups": len(informative),
               "dynamic_sampling/extra_generation_time": sum(r[3] for r in rounds[1:]),
               "dynamic_sampling/generated_tokens": generated}
    return kept_rows, concat_rollouts(kept_rollouts, pad_id), RewardScores.concat(kept_scores), dynamic


def _gather_scores(scores: RewardScores) -> RewardScores:
    """The rewards of the whole step, every process's in rank order (the step's prompt order)."""
    return RewardScores(names=scores.names, per_function=distributed.all_gather_tensor(scores.per_function),
                        total=distributed.all_gather_tensor(scores.total))
