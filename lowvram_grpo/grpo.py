"""The GRPO math, as pure tensor functions.

GRPO (Group Relative Policy Optimization, DeepSeekMath 2024) in one step:

1. For each prompt, sample G completions ("a group") from the current policy.
2. Score every completion with the reward functions. The *advantage* of a completion is its
   reward relative to its group: (r - mean(group)) / (std(group) + eps). No value network:
   the group itself is the baseline, which is what makes GRPO cheap enough for one GPU.
3. Update the policy with the PPO clipped surrogate on every completion token,
       ratio = pi(token) / pi_old(token)
       loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL(pi || pi_ref)
   where KL is the per-token "k3" estimator exp(ref - logp) - (ref - logp) - 1 (non-negative,
   unbiased, low variance), by default weighted by the ratio as TRL does, and pi_ref is the
   frozen starting model (for LoRA: the same weights with the adapter disabled).
4. Average the per-token losses into one number; *how* is what distinguishes the variants
   (`loss_type`): grpo averages per sequence then over sequences, bnpo / dapo average over
   tokens, dr_grpo divides by a constant so long and short completions weigh the same per token.
   The later variants also change the per-token term: cispo clips the ratio as a weight (all
   tokens keep a gradient), sapo gates it smoothly, vespo weights whole sequences smoothly,
   luspo is GSPO with each sequence weighted by its length (see `policy_token_loss`).

These functions implement this, and they are written to reproduce TRL 1.16's `GRPOTrainer`
exactly (tests/test_grpo_oracle.py checks losses and LoRA gradients against it):

- `group_advantages`  step 2 (`normalize_then_sum_advantages` for GDPO's per-function variant).
- the per-token log pi(token) the loss takes come from `logprobs.sequence_logprobs`.
- `grpo_loss`         steps 3-4 for one micro-batch, pre-scaled for gradient accumulation, for
                      an `Objective` (the loss type and its options); returns `LossStats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from lowvram_grpo.config import (  # the values, named once, with the config
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    SCALE_REWARDS,
    TrainConfig,
)

# The loss types whose per-token loss is PPO's clipped surrogate (the others reshape the ratio).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")

# Added to the std before dividing, so a group whose rewards are all equal (std 0) gets
# advantage 0 instead of 0/0. Same value as TRL.
ADVANTAGE_EPS = 1e-4


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample std (Bessel-corrected) ignoring NaNs; NaN where fewer than 2 values are present.

    Same definition as `trl.trainer.utils.nanstd`, so advantages match TRL bit for bit.
    """
    if dim is None:  # reduce over everything
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * correction)


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages, exactly as TRL 1.16 (`multi_objective_aggregation="sum_then_normalize"`).

    Args:
        rewards: (N,) summed, weighted reward per completion, N = num_prompts * num_generations,
            the completions of one prompt contiguous. NaN marks an unscorable completion (every
            reward function returned None): it is left out of its group's mean and std and its
            advantage is 0, so it neither biases the baseline nor moves the policy.
        num_generations: G, the group size.
        scale_rewards: "group" divides by the group std, "batch" by the std of the whole batch
            (more robust when a group's std is tiny), "none" does not divide (Dr. GRPO: the std
            division up-weights easy/hard prompts whose rewards barely vary).

    Returns:
        (advantages (N,), reward_std (N,)). reward_std is the std TRL checks for zero to log
        `frac_reward_zero_std`: the group std for "group"/"none", the batch std for "batch".
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by num_generations={num_generations}, "
            f"got shape {tuple(rewards.shape)}"
        )
    rewards = rewards.float()
    groups = rewards.view(-1, num_generations)
    group_mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)

    if scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = _nanstd(groups, dim=1).repeat_interleave(num_generations)
    else:  # a group of one has no spread; TRL treats its std as 0 (only happens in eval)
        std = torch.zeros_like(rewards)

    advantages = rewards - group_mean
    if scale_rewards != "none":
        advantages = advantages / (std + ADVANTAGE_EPS)
    # NaN comes from unscorable completions (or an all-NaN group): no learning signal.
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages, std


def normalize_then_sum_advantages(
    per_function: torch.Tensor, weights: torch.Tensor, num_generations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages with `multi_objective_aggregation="normalize_then_sum"` (GDPO), exactly as TRL 1.16.

    Each reward function is normalised within each group first, then the normalised rewards are
    weighted and summed, and the sum is normalised over the whole batch. With several rewards of
    different scales (a 0/1 correctness and a 0..0.25 format score), summing first lets the large
    one drown the small one's within-group ranking; this keeps each function's ranking. TRL
    ignores `scale_rewards` here, and so do we.

    Args:
        per_function: (N, F) rewards per function, NaN where a function returned None.
        weights: (F,) reward weights.

    Returns:
        (advantages (N,), reward_std (N,)): reward_std is the batch std of the summed normalised
        rewards (what TRL checks for zero to log `frac_reward_zero_std`).
    """
    per_function = per_function.float()
    num_functions = per_function.size(1)
    unscorable = torch.isnan(per_function).all(dim=1)
    grouped = per_function.view(-1, num_generations, num_functions)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = _nanstd(grouped, dim=1).unsqueeze(1) if num_generations > 1 else torch.zeros_like(mean)
    normalised = ((grouped - mean) / (std + ADVANTAGE_EPS)).view(-1, num_functions)
    rewards = (normalised * weights.to(normalised).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = float("nan")
    batch_std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (batch_std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages, nan=0.0), batch_std


def step_advantages(per_function: torch.Tensor, total: torch.Tensor, weights: torch.Tensor, num_generations: int,
                    aggregation: str = "sum_then_normalize", scale_rewards: str = "group"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's advantages as `multi_objective_aggregation` asks: normalise each function first
    (normalize_then_sum_advantages) or the weighted total (group_advantages, with scale_rewards)."""
    if aggregation == "normalize_then_sum":
        return normalize_then_sum_advantages(per_function, weights, num_generations)
    return group_advantages(total, num_generations, scale_rewards)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """The GRPO objective of a run: the policy term, its clipping and aggregation, the KL and
    the entropy terms. Field names are TRL's (`GRPOTrainer`'s attributes and `GRPOConfig`'s keys).

    Built once from the config (`from_config`); `entropy_coef` is the config's starting value,
    which the trainer's entropy control replaces for each update (`dataclasses.replace`).
    """

    loss_type: str  # the policy term and how per-token losses become one number (grpo_loss)
    beta: float  # KL coefficient
    epsilon_low: float  # clip range [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float  # for cispo: the cap on the ratio itself
    max_completion_length: int  # dr_grpo's constant denominator per sequence
    # Multiply the k3 term by the (differentiable) ratio pi / pi_old, as TRL 1.16 does by default
    # (DeepSeek-V3.2): k3's plain gradient is a biased estimate of the reverse-KL gradient, ratio
    # * k3's is unbiased. On-policy (ratio == 1) this leaves the loss value unchanged but not its
    # gradient.
    use_bias_correction_kl: bool = True
    # "token" (one ratio per token) or "sequence" (GSPO: one ratio per sequence, exp of the mean
    # token log-ratio, shared by all its tokens).
    importance_sampling_level: str = "token"
    # INTELLECT-2's two-sided clipping: also cap the unclipped ratio at `delta`, so a
    # negative-advantage token whose ratio exploded cannot dominate the step.
    delta: float | None = None
    sapo_temperature_pos: float = 1.0  # SAPO's gate temperatures for positive / other advantages
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0  # VESPO's weight shape (vespo_weights)
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # DeepSeek-V3.2's off-policy sequence mask: drop sequences with a negative advantage whose
    # mean log(pi_old / pi) exceeds it (None: off).
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0  # keep only the top quantile of tokens by entropy in the policy term
    entropy_coef: float = 0.0  # subtract coef * (masked mean entropy) from the loss (exploration bonus)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")

    @classmethod
    def from_config(cls, config: TrainConfig) -> Objective:
        return cls(loss_type=config.loss_type, beta=config.beta, epsilon_low=config.epsilon,
                   epsilon_high=config.clip_high, max_completion_length=config.max_completion_length,
                   use_bias_correction_kl=config.use_bias_correction_kl,
                   importance_sampling_level=config.importance_sampling_level, delta=config.delta,
                   sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
                   vespo_k_pos=config.vespo_k_pos, vespo_lambda_pos=config.vespo_lambda_pos,
                   vespo_k_neg=config.vespo_k_neg, vespo_lambda_neg=config.vespo_lambda_neg,
                   off_policy_mask_threshold=config.off_policy_mask_threshold,
                   top_entropy_quantile=config.top_entropy_quantile, entropy_coef=config.entropy_coef)

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss uses the per-token entropy (not only logs it)."""
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0


@dataclass
class LossStats:
    """One micro-batch's loss statistics, detached.

    Sums over this micro-batch, to be summed over the step and divided by their counts for
    logging (`sums()`), but for the two `extremes()`. None where the objective has no such
    statistic.
    """

    token_count: torch.Tensor  # completion tokens
    # What the ratio statistics are over: tokens, or sequences when the ratio is per sequence
    # (as TRL counts them).
    ratio_count: torch.Tensor
    # The masked KL term as it enters the loss (TRL's logged `kl`); with ref_logps.
    kl_sum: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None  # over token_count; with entropies
    # Entropy over the tokens the policy term and entropy bonus act on: what the adaptive
    # entropy control measures; with entropies.
    bonus_entropy_sum: torch.Tensor | None = None
    bonus_token_count: torch.Tensor | None = None
    # The clipped family: ratios clipped low / high / either, over ratio_count.
    clip_low_count: torch.Tensor | None = None
    clip_high_count: torch.Tensor | None = None
    clip_region_count: torch.Tensor | None = None
    # Not sums: the smallest / largest fraction of a sequence's ratios clipped low / high in this
    # micro-batch (TRL's `clip_ratio/low_min` and `/high_max` before averaging over
    # micro-batches; NaN when no sequence has a token).
    clip_low_min: torch.Tensor | None = None
    clip_high_max: torch.Tensor | None = None
    cispo_clip_count: torch.Tensor | None = None  # cispo: ratios capped, over ratio_count
    vespo_phi_sum: torch.Tensor | None = None  # vespo: sequence weights, over ratio_count (sequences)

    EXTREMES = ("clip_low_min", "clip_high_max")

    def _present(self) -> dict[str, float]:
        return {f.name: float(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def sums(self) -> dict[str, float]:
        """The statistics that add up over micro-batches, by field name."""
        return {k: v for k, v in self._present().items() if k not in self.EXTREMES}

    def extremes(self) -> dict[str, float]:
        """The per-micro-batch extremes (`clip_low_min`, `clip_high_max`), by field name."""
        return {k: v for k, v in self._present().items() if k in self.EXTREMES}


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """True for the completion tokens whose entropy is in the top `top_quantile` of this micro-batch.

    "Beyond the 80/20 rule" (Wang et al. 2025): the few high-entropy "forking" tokens carry most
    of the learning signal. Same definition as TRL's `get_high_entropy_mask`; with several
    processes TRL takes the quantile over all processes' micro-batches together, this function
    over the micro-batch it is given.
    """
    local = entropies.detach()[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(local, 1.0 - top_quantile)
    return ((entropies.detach() * mask) >= threshold) & mask.bool()


def _nan_extreme(values: torch.Tensor, extreme) -> torch.Tensor:
    """torch.min or torch.max of `values` ignoring NaN; NaN if there is nothing else (TRL's nanmin/nanmax)."""
    values = values[~torch.isnan(values)]
    return extreme(values) if values.numel() else torch.tensor(float("nan"))


@torch.no_grad()
def vespo_weights(advantages, log_ratio, mask, k_pos, lambda_pos, k_neg, lambda_neg) -> torch.Tensor:
    """VESPO's (B, 1) sequence weights phi(w) = e^lambda * w^k * e^(-lambda * w), phi(1) = 1.

    w is the sequence's importance ratio pi / pi_old (a product over its tokens, not a mean);
    k and lambda depend on the advantage's sign. phi is a smooth, asymmetric replacement for
    clipping: it fades sequences whose ratio moved far from 1 instead of cutting them off.
    Computed in log space, no gradient, exactly as TRL's `get_gamma_weights` (without vLLM's
    sampler correction).
    """
    lower = math.log(1e-8)
    seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    objective: Objective,
    *,
    num_sequences_in_step: int,
    num_tokens_in_step: float,
    num_micro_batches: int,
    entropies: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """One micro-batch's share of the step loss: policy term + beta * KL, aggregated.

    Scaled so that calling `.backward()` on every micro-batch's loss accumulates exactly the
    gradient of the whole step's loss, i.e. what TRL 1.16's `_compute_loss` produces when the
    step is split into `num_micro_batches` equal micro-batches. Names are TRL's.

    Args:
        logps: (B, T) log-probs under the current policy, with grad.
        old_logps: (B, T) log-probs of the policy that sampled the completions, or None when
            this is the first (only) update on them: then the ratio is exactly 1 but its
            gradient, d ratio = d logp, still flows.
        ref_logps: (B, T) reference-model log-probs; required when objective.beta > 0.
        advantages: (B,) one advantage per completion, shared by all its tokens.
        completion_mask: (B, T) 1 for real completion tokens, 0 for padding.
        objective: the loss type and its options (`Objective`).
        num_sequences_in_step: completions in the whole optimizer step (all micro-batches).
        num_tokens_in_step: active completion tokens in the whole step (dapo's denominator).
        num_micro_batches: micro-batches (gradient-accumulation steps) in the step.
        entropies: (B, T) per-token entropy; needed for top_entropy_quantile < 1 and
            entropy_coef != 0 (then with grad, see `logprobs.sequence_logprobs(entropy_grad=True)`).

    The loss type sets the per-token term (`policy_token_loss`) and the aggregation (`aggregate_loss`).

    Returns:
        (loss, `LossStats` of this micro-batch).
    """
    o = objective
    if o.beta != 0.0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    if entropies is None and o.needs_entropy:
        raise ValueError("entropies are required when top_entropy_quantile < 1 or entropy_coef != 0")

    mask = completion_mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages

    # Padding positions are zeroed before exp(): they are masked out anyway, but an overflow to
    # inf there would turn into inf * 0 = NaN in both the loss and its gradient.
    log_ratio = torch.where(mask.bool(), logps - old_logps, 0.0)
    coef_1 = importance_ratio(log_ratio, mask, o.importance_sampling_level)
    kl = None
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps, mask, coef_1 if o.use_bias_correction_kl else None)
    phi = None
    if o.loss_type == "vespo":
        phi = vespo_weights(advantages, log_ratio, mask, o.vespo_k_pos, o.vespo_lambda_pos, o.vespo_k_neg,
                            o.vespo_lambda_neg)

    per_token_loss = policy_token_loss(o, coef_1, advantages, logps, phi)
    if o.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_keep(logps, old_logps, advantages, mask,
                                                          o.off_policy_mask_threshold)
    # The tokens the policy term trains on; the entropy bonus acts on the same.
    acting = mask
    if o.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, mask, o.top_entropy_quantile).to(mask.dtype)
        per_token_loss = per_token_loss * entropy_mask
        acting = mask * entropy_mask
    if o.beta != 0.0:  # the KL applies to every token, masked or not by the options above
        per_token_loss = per_token_loss + o.beta * kl

    loss = aggregate_loss(per_token_loss, mask, o, num_sequences_in_step, num_tokens_in_step, num_micro_batches)
    if o.entropy_coef != 0.0:
        loss = loss - entropy_bonus(o.entropy_coef, entropies, acting, num_micro_batches)
    stats = loss_stats(o, mask, coef_1, advantages, kl=kl, phi=phi, entropies=entropies, acting=acting)
    return loss, stats


def importance_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """TRL's `coef_1`: pi / pi_old per token (B, T), or per sequence (B, 1) for GSPO's "sequence"
    level: the geometric mean of the token ratios, shared by all its tokens."""
    if level == "token":
        return torch.exp(log_ratio)
    return torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
          ratio: torch.Tensor | None) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref), times `ratio` if given (use_bias_correction_kl)."""
    ref_log_ratio = torch.where(mask.bool(), ref_logps - logps, 0.0)  # log(pi_ref / pi) per token
    kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1  # k3: >= 0, and exactly 0 where policy == reference
    return kl if ratio is None else kl * ratio


def off_policy_keep(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """(B, 1) 0 for the sequences DeepSeek-V3.2's off-policy mask drops, 1 for the others.

    The mean per-token log(pi_old / pi) of each sequence is how far the policy has moved from
    the one that sampled it. Only sequences with a negative advantage are ever dropped.
    """
    drift = torch.where(mask.bool(), old_logps - logps.detach(), 0.0)
    seq_drift = drift.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (seq_drift <= threshold)).to(mask.dtype)


def policy_token_loss(o: Objective, coef_1: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor,
                      phi: torch.Tensor | None) -> torch.Tensor:
    """The policy term per token, by loss type (r = ratio, A = advantage, sg = no gradient):

        grpo, bnpo, dr_grpo, dapo, luspo  -min(r A, clip(r, 1 - low, 1 + high) A)
        cispo   -sg(min(r, epsilon_high)) A log pi      (clip the weight, keep every gradient)
        sapo    -(4 / tau) sigmoid(tau (r - 1)) A       (a soft gate instead of a hard clip)
        vespo   -sg(phi(w_seq)) A log pi                (smooth sequence weight, see vespo_weights)
    """
    if o.loss_type == "cispo":
        return -torch.clamp(coef_1, max=o.epsilon_high).detach() * advantages * logps
    if o.loss_type in CLIPPED_LOSS_TYPES:
        return clipped_surrogate(coef_1, advantages, o.epsilon_low, o.epsilon_high, o.delta)
    if o.loss_type == "sapo":
        tau = torch.where(advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        return -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * advantages
    return -phi * advantages * logps  # vespo


def clipped_surrogate(coef_1: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                      delta: float | None) -> torch.Tensor:
    """PPO's pessimistic bound: clipping only ever removes the incentive to move the ratio further."""
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, o: Objective, num_sequences_in_step: int,
                   num_tokens_in_step: float, num_micro_batches: int) -> torch.Tensor:
    """Per-token losses -> this micro-batch's share of the step loss, by loss type
    (S = num_sequences_in_step, M = num_micro_batches):

        grpo, sapo          sum over these sequences of (masked token mean) / S
        bnpo                masked token mean of this micro-batch / M
        dr_grpo             masked token sum / (S * max_completion_length)
        dapo, cispo, vespo  masked token sum / num_tokens_in_step
        luspo               masked token sum / S (each sequence weighs by its length)

    (B, 1) sequence-level terms broadcast against the mask here.
    """
    masked = per_token_loss * mask
    if o.loss_type in ("grpo", "sapo"):
        seq_mean = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return seq_mean.sum() / num_sequences_in_step
    if o.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / num_micro_batches
    if o.loss_type == "dr_grpo":
        return masked.sum() / (num_sequences_in_step * o.max_completion_length)
    if o.loss_type == "luspo":
        return masked.sum() / num_sequences_in_step
    return masked.sum() / max(float(num_tokens_in_step), 1.0)  # dapo, cispo, vespo


def entropy_bonus(entropy_coef: float, entropies: torch.Tensor, acting: torch.Tensor,
                  num_micro_batches: int) -> torch.Tensor:
    """entropy_coef times the mean entropy over the tokens the bonus acts on, this micro-batch's
    share: a plain mean whatever the loss type's normaliser, so entropy_coef means the same for
    every loss type (as in TRL)."""
    return entropy_coef * (entropies * acting).sum() / acting.sum().clamp(min=1.0) / num_micro_batches


@torch.no_grad()
def loss_stats(o: Objective, mask: torch.Tensor, coef_1: torch.Tensor, advantages: torch.Tensor, *,
               kl: torch.Tensor | None, phi: torch.Tensor | None, entropies: torch.Tensor | None,
               acting: torch.Tensor) -> LossStats:
    """This micro-batch's `LossStats`, with TRL's definitions."""
    per_sequence = coef_1.size(1) == 1  # TRL counts sequence-level ratios once per sequence
    stats = LossStats(token_count=mask.sum(),
                      ratio_count=torch.tensor(float(coef_1.size(0))) if per_sequence else mask.sum())
    if entropies is not None:
        stats.entropy_sum = (entropies.detach() * mask).sum()
        stats.bonus_entropy_sum, stats.bonus_token_count = (entropies.detach() * acting).sum(), acting.sum()
    if o.loss_type in CLIPPED_LOSS_TYPES:
        # TRL counts the ratio as it entered the surrogate: capped at delta.
        ratio = coef_1 if o.delta is None else torch.clamp(coef_1, max=o.delta)
        _clip_stats(stats, ratio, advantages, mask, o.epsilon_low, o.epsilon_high)
    elif o.loss_type == "cispo":
        stats.cispo_clip_count = _ratio_total((coef_1 > o.epsilon_high) & (advantages > 0), mask)
    elif o.loss_type == "vespo":
        stats.vespo_phi_sum = phi.sum()
        stats.ratio_count = torch.tensor(float(phi.size(0)))
    if kl is not None:
        stats.kl_sum = (kl * mask).sum()
    return stats


def _ratio_total(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of a per-ratio statistic: per token over the mask, or once per sequence."""
    return x.float().sum() if x.size(1) == 1 else (x * mask).sum()


def _clip_stats(stats: LossStats, ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                epsilon_low: float, epsilon_high: float) -> None:
    """The clipped family's clip statistics: a ratio counts as clipped only where clipping
    changes the loss (TRL's definition)."""
    is_low = (ratio < 1 - epsilon_low) & (advantages < 0)
    is_high = (ratio > 1 + epsilon_high) & (advantages > 0)

    def per_sequence_mean(x: torch.Tensor) -> torch.Tensor:  # NaN for a sequence without tokens
        return x.float().squeeze(1) if x.size(1) == 1 else (x * mask).sum(-1) / mask.sum(-1)

    stats.clip_low_count, stats.clip_high_count = _ratio_total(is_low, mask), _ratio_total(is_high, mask)
    stats.clip_region_count = _ratio_total(is_low | is_high, mask)
    stats.clip_low_min = _nan_extreme(per_sequence_mean(is_low), torch.min)
    stats.clip_high_max = _nan_extreme(per_sequence_mean(is_high), torch.max)
