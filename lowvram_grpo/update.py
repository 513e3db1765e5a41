"""The update phase of a GRPO step: the rollout in micro-batches, their log-probs without
gradients (reference, old policy), and the gradient step itself.

`_update` accumulates the loss's gradient over micro-batches (`_accumulate_gradients`, under
out-of-memory back-off), sums it over processes, clips it and steps the optimizer; a step whose
loss or gradient is not finite is skipped, never applied. The loop (trainer.py) calls it once
per iteration of a step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowvram_grpo import distributed, grpo, logprobs
from lowvram_grpo.offload import offloader_of
from lowvram_grpo.planning.backoff import retry_on_oom
from lowvram_grpo.planning.chunking import UPDATE, Chunking
from lowvram_grpo.rollout import Rollout
from lowvram_grpo.sequence_chunks import is_chunked

if TYPE_CHECKING:  # annotations only: the trainer builds the Learner and calls this module
    from lowvram_grpo.trainer import Learner

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # prompt + completion, trimmed to this micro-batch's widths
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # (B, C) float: the tokens the loss counts (Rollout.loss_mask)
    rows: slice  # which rows of the step's rollout these are
    model_inputs: dict[str, torch.Tensor]  # pixel_values etc. of these rows' images ({} for text)

    @property
    def logits_to_keep(self) -> int:
        return self.completion_mask.size(1)


def micro_batches(rollout: Rollout, size: int, device: torch.device) -> list[MicroBatch]:
    """Split the rollout into micro-batches, trimming padding columns no row in it needs:
    short completions in one micro-batch should not pay for a long one in another."""
    batches = []
    for start in range(0, rollout.num_sequences, size):
        rows = slice(start, min(start + size, rollout.num_sequences))
        prompt_mask = rollout.prompt_mask[rows]
        completion_mask = rollout.completion_mask[rows]
        loss_mask = rollout.loss_mask[rows]
        first_prompt_col = int((prompt_mask.sum(0) > 0).nonzero()[0]) if prompt_mask.any() else prompt_mask.size(1) - 1
        completion_width = max(int(completion_mask.sum(1).max()), 1)
        prompt_ids = rollout.prompt_ids[rows, first_prompt_col:]
        completion_ids = rollout.completion_ids[rows, :completion_width]
        batches.append(MicroBatch(
            input_ids=torch.cat([prompt_ids, completion_ids], 1).to(device),
            attention_mask=torch.cat([prompt_mask[:, first_prompt_col:], completion_mask[:, :completion_width]], 1).to(device),
            completion_mask=loss_mask[:, :completion_width].float().to(device),
            rows=rows, model_inputs={k: v.to(device) if isinstance(v, torch.Tensor) else v
                                     for k, v in rollout.forward_inputs(rows, prompt_ids.size(1),
                                                                        completion_width).items()}))
    return batches


def _rows_of(logps: torch.Tensor | None, mb: MicroBatch) -> torch.Tensor | None:
    """The part of a whole-rollout (N, C) log-prob tensor that belongs to micro-batch `mb`."""
    return None if logps is None else logps[mb.rows, :mb.logits_to_keep]


@torch.no_grad()
def frozen_logprobs(policy, rollout: Rollout, chunking: Chunking, temperature: float,
                    device: torch.device) -> torch.Tensor:
    """Per-token log-probs without gradients (reference or old policy), as one (N, C) tensor
    over the whole rollout, so that the update may split it into different micro-batches."""
    was_training = policy.training
    policy.eval()  # no dropout: these are the fixed targets of the update
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=device)
    try:
        for mb in micro_batches(rollout, chunking.micro_batch_size, device):
            out[mb.rows, :mb.logits_to_keep] = logprobs.sequence_logprobs(
                policy, mb.input_ids, mb.attention_mask, mb.logits_to_keep,
                temperature=temperature, chunk_size=chunking.logprob_chunk_size, model_inputs=mb.model_inputs)[0]
    finally:
        policy.train(was_training)
    return out


def _update(learner: Learner, rollout: Rollout, advantages: torch.Tensor, ref_logps: torch.Tensor | None,
            old_logps: torch.Tensor | None, oom_events: list[str] | None = None,
            step_counts: tuple[int, float] | None = None) -> dict[str, float]:
    """Accumulate the step's gradient over micro-batches, then clip and apply it. A step whose
    loss or gradient is not finite is skipped (reported), never applied. With fp16, the
    learner's scaler scales the loss (see build_loss_scaler).

    With several processes, `rollout` (and `advantages`, the log-probs) is this process's share
    of the step; the loss is normalised by the whole step, and the gradients are summed over
    processes before clipping, so the update is the one a single process would make with the
    whole step's sequences, and it is identical on every process.

    `step_counts` (sequences, completion tokens) are the step's normalisers when `rollout` is
    only part of it (zero_std_groups: the groups left out add nothing but still count).
    """
    config, optimizer, scaler = learner.config, learner.optimizer, learner.scaler
    world_size = distributed.world().world_size
    # The whole step's counts (dapo divides by all its completion tokens; shares are equal in
    # sequences, not in tokens). Counted here, outside the out-of-memory retry, so that a
    # retry on one process never meets a collective the others are not in.
    if step_counts is None:
        step_counts = (rollout.num_sequences * world_size,
                       distributed.all_reduce_sum(float(rollout.loss_mask.sum())))
    num_sequences, num_tokens = max(step_counts[0], 1), step_counts[1]
    with learner.on_phase(UPDATE):
        sums, extremes = retry_on_oom(UPDATE, learner.chunking, lambda sizes: _accumulate_gradients(
            learner, rollout, advantages, ref_logps, old_logps, num_sequences, num_tokens, sizes),
            oom_events if oom_events is not None else [], hint=_update_hint(learner))

    # All-reduce the LoRA gradients (SUM): every process now holds the whole step's gradient.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        # Nothing to backward (every group skipped): a zero gradient, as the kept groups would
        # have given, so the optimizer still steps (its moments decay) exactly as with them.
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    distributed.all_reduce_gradients(params)
    # A process whose groups were all skipped has no statistics: every process must reduce the
    # same keys. Each process's per-micro-batch extremes come along.
    everyone = distributed.gather_objects((sorted(sums), extremes))
    keys = set().union(*(process_keys for process_keys, _ in everyone))
    sums = distributed.all_reduce_sum({key: sums.get(key, 0.0) for key in keys})
    loss_total = sums.pop("loss")
    # The adaptive entropy coefficient follows the step's entropy over every process (if any
    # token was trained on: a step whose groups were all skipped measured nothing).
    control = learner.entropy_control
    if sums.get("bonus_token_count", 0.0) > 0:
        control.update(sums["bonus_entropy_sum"] / sums["bonus_token_count"])
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and report the true gradient
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
    skipped = not (math.isfinite(loss_total) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        learner.scheduler.step()  # the schedule counts applied updates, as transformers' Trainer does
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()  # halves the scale after an overflow, doubles it after a calm stretch

    tokens = max(sums.get("token_count", 0.0), 1.0)
    ratios = max(sums.get("ratio_count", 0.0), 1.0)  # tokens, or sequences for sequence-level ratios
    result = {"loss": loss_total, "grad_norm": grad_norm, "step_skipped": int(skipped),
              "entropy": sums.get("entropy_sum", 0.0) / tokens}
    for key, name in (("clip_low_count", "clip_ratio/low_mean"), ("clip_high_count", "clip_ratio/high_mean"),
                      ("clip_region_count", "clip_ratio/region_mean"), ("cispo_clip_count", "cispo_clip_ratio"),
                      ("vespo_phi_sum", "vespo/phi_seq_mean")):
        if key in sums or (name.startswith("clip_ratio") and config.loss_type in grpo.CLIPPED_LOSS_TYPES):
            result[name] = sums.get(key, 0.0) / ratios
    if config.loss_type in grpo.CLIPPED_LOSS_TYPES:
        per_process = [process_extremes for _, process_extremes in everyone]
        result["clip_ratio/low_min"] = _mean_of_micro_batch_extremes(per_process, "clip_low_min", min)
        result["clip_ratio/high_max"] = _mean_of_micro_batch_extremes(per_process, "clip_high_max", max)
    if control.enabled:
        result["entropy_coef"] = control.coef  # as TRL logs it: the coefficient for the next update
    if ref_logps is not None:
        result["kl"] = sums.get("kl_sum", 0.0) / tokens
    if scaler is not None:
        result["loss_scale"] = scaler.get_scale()
    if skipped and distributed.is_main_process():
        if scaler is not None and math.isfinite(loss_total):
            print(f"note: fp16 gradients overflowed; this update was skipped and the loss scale lowered to "
                  f"{scaler.get_scale():g} (normal now and then with fp16)", flush=True)
        else:
            logger.warning(f"non-finite loss ({loss_total}) or gradient norm ({grad_norm}); "
                           "this update was skipped, not applied")
    return result


def _update_hint(learner: Learner) -> str:
    """For the out-of-memory message of the update: the long-context settings that are off."""
    off = [name for name, on in (("offload_activations", offloader_of(learner.policy) is not None),
                                 ("sequence_chunk_size", is_chunked(learner.policy))) if not on]
    return f"or set {' and '.join(f'{name}=auto' for name in off)} (see `lowvram-grpo plan`)" if off else ""


def _mean_of_micro_batch_extremes(per_process: list[dict[str, list[float]]], key: str, extreme) -> float:
    """TRL's `clip_ratio/low_min` and `/high_max`: for each micro-batch, the min (max) over the
    sequences of every process's micro-batch of that index (TRL gathers them), then the mean
    over micro-batches, leaving out NaN (micro-batches without tokens); NaN if nothing is left."""
    lists = [process.get(key, []) for process in per_process]
    values = []
    for i in range(max(map(len, lists), default=0)):
        found = [values_i[i] for values_i in lists if i < len(values_i) and not math.isnan(values_i[i])]
        if found:
            values.append(extreme(found))
    return sum(values) / len(values) if values else math.nan


def _accumulate_gradients(learner: Learner, rollout: Rollout, advantages: torch.Tensor,
                          ref_logps: torch.Tensor | None, old_logps: torch.Tensor | None,
                          num_sequences: int, num_tokens: float,
                          chunking: Chunking) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Backward every micro-batch of `rollout` at `chunking`'s sizes, leaving the summed gradient
    in `.grad` (times the loss scale, with a scaler); returns the summed loss ("loss") and the
    loss statistics' sums (`LossStats.sums`, for token-weighted means), and their extremes
    (`LossStats.extremes`), one value per micro-batch."""
    config, scaler = learner.config, learner.scaler
    # The coefficient the entropy control sets, the same for every micro-batch of the step.
    objective = dataclasses.replace(learner.objective, entropy_coef=learner.entropy_control.applied_coef())
    learner.optimizer.zero_grad(set_to_none=True)  # a clean slate, also when redone after out-of-memory
    batches = micro_batches(rollout, chunking.micro_batch_size, learner.device)
    # bnpo divides each micro-batch's token mean by the number of micro-batches. Counting every
    # process's micro-batches (this one's times the number of processes) makes the summed
    # gradient the average of the processes' per-micro-batch means: what DDP's gradient
    # averaging gives, and exactly one process's result when the micro-batches line up.
    num_micro_batches = len(batches) * distributed.world().world_size
    sums: dict[str, float] = {}
    extremes: dict[str, list[float]] = {}
    loss_total = 0.0
    for mb in batches:
        logps, entropy = logprobs.sequence_logprobs(
            learner.policy, mb.input_ids, mb.attention_mask, mb.logits_to_keep,
            temperature=config.temperature, chunk_size=chunking.logprob_chunk_size, compute_entropy=True,
            entropy_grad=objective.entropy_coef != 0.0, model_inputs=mb.model_inputs)
        loss, stats = grpo.grpo_loss(
            logps, _rows_of(old_logps, mb), _rows_of(ref_logps, mb), advantages[mb.rows], mb.completion_mask,
            objective, num_sequences_in_step=num_sequences, num_tokens_in_step=num_tokens,
            num_micro_batches=num_micro_batches, entropies=entropy)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += loss.item()
        for key, value in stats.sums().items():
            sums[key] = sums.get(key, 0.0) + value
        for key, value in stats.extremes().items():
            extremes.setdefault(key, []).append(value)
    sums["loss"] = loss_total
    return sums, extremes
