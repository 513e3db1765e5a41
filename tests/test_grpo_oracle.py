"""Correctness oracle: lowvram_grpo.grpo against TRL 1.16's GRPOTrainer, on the same model and inputs.

One real `GRPOTrainer` (tiny random Qwen2 + LoRA, CPU, fp32) is built per module. Its
`_compute_loss` is fed hand-made rollouts (left-padded prompts, right-padded completions,
advantages, old/ref log-probs), split into two micro-batches exactly as TRL's gradient
accumulation would, and our `sequence_logprobs` + `grpo_loss` must give the same per-micro-batch
losses, the same accumulated gradient on every LoRA parameter, and the same logged metrics.

Running TRL's loss outside `train()` only needs three attributes that the training loop would
set: `current_gradient_accumulation_steps`, `args.steps_per_generation` (dapo's normaliser) and
the model in train mode. The loss knobs (`loss_type`, `beta`, `args.use_bias_correction_kl`, and
every objective option: `importance_sampling_level`, `delta`, `top_entropy_quantile`, SAPO/VESPO
parameters, ...) are read at call time, so one trainer serves every case. The temperature is baked
into TRL's fused LM head at construction, so it is fixed for the module.
"""

import warnings

import pytest
import torch

from lowvram_grpo.grpo import Objective, group_advantages, grpo_loss, normalize_then_sum_advantages
from lowvram_grpo.logprobs import sequence_logprobs

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TEMPERATURE = 0.7
MAX_COMPLETION_LENGTH = 8  # longer than the completions below, so dr_grpo's constant is not their length
PAD = 2
MICRO_BATCHES = (slice(0, 3), slice(3, 6))  # one step = two equal micro-batches of 3 completions


def tiny_tokenizer():
    """A word-level tokenizer over "t0".."t63", built offline (no hub access in tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="t1", pad_token=f"t{PAD}")


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # TRL defaults gradient checkpointing on
        per_device_train_batch_size=6,
        num_generations=2,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=TEMPERATURE,
        epsilon=0.2,
        epsilon_high=0.28,
    )
    # init_lora_weights=False: random A *and* B, so the adapter changes the model (B = 0 would make
    # every lora_A gradient zero and the policy equal to the reference, hiding bugs).
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = GRPOTrainer(model=model, reward_funcs=constant_reward, args=args, processing_class=tiny_tokenizer(),
                              train_dataset=Dataset.from_dict({"prompt": ["t3 t4", "t5 t6 t7"] * 3}), peft_config=lora)
    trainer.model.train()  # TRL picks its "train" normalisers from model.training
    trainer.current_gradient_accumulation_steps = len(MICRO_BATCHES)  # set by Trainer.train() normally
    trainer.args.steps_per_generation = len(MICRO_BATCHES)  # one generation batch = one optimizer step
    return trainer


@pytest.fixture(scope="module")
def rollouts(trainer):
    """A hand-made step of 6 completions, with padding on both sides and off-policy old log-probs."""
    g = torch.Generator().manual_seed(1)
    batch, prompt_len, completion_len = 6, 5, 7
    prompt_ids = torch.randint(3, 64, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = prompt_mask[4, :1] = 0  # left padding
    completion_ids = torch.randint(3, 64, (batch, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 5:] = completion_mask[3, 2:] = completion_mask[5, 6:] = 0  # ended early
    prompt_ids[prompt_mask == 0] = PAD
    completion_ids[completion_mask == 0] = PAD

    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        policy, _ = sequence_logprobs(trainer.model, input_ids, attention_mask, completion_len, TEMPERATURE)
        with trainer.model.disable_adapter():
            ref, _ = sequence_logprobs(trainer.model, input_ids, attention_mask, completion_len, TEMPERATURE)
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.randn(batch, generator=g),
        # +-0.3 nats of drift: enough for some tokens to leave the [0.8, 1.28] clip range
        old_per_token_logps=policy + 0.3 * torch.randn(batch, completion_len, generator=g),
        ref_per_token_logps=ref,
        num_items_in_batch=completion_mask.sum(),  # TRL: active completion tokens in the generation batch
    )


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# Each option under TRL's name: where TRL reads it (an attribute of the trainer or of its args).
TRL_ATTRIBUTES = {"importance_sampling_level": "trainer", "off_policy_mask_threshold": "trainer",
                  "top_entropy_quantile": "trainer", "epsilon_high": "trainer", "delta": "args",
                  "sapo_temperature_pos": "args", "sapo_temperature_neg": "args", "vespo_k_pos": "args",
                  "vespo_lambda_pos": "args", "vespo_k_neg": "args", "vespo_lambda_neg": "args"}
DEFAULT_OPTIONS = {"importance_sampling_level": "token", "off_policy_mask_threshold": None,
                   "top_entropy_quantile": 1.0, "epsilon_high": 0.28, "delta": None, "sapo_temperature_pos": 1.0,
                   "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0,
                   "vespo_lambda_neg": 2.0}


def _set_trl_options(trainer, options: dict) -> None:
    for key, default in DEFAULT_OPTIONS.items():
        target = trainer if TRL_ATTRIBUTES[key] == "trainer" else trainer.args
        setattr(target, key, options.get(key, default))
    coef = options.get("entropy_coef", 0.0)
    trainer.entropy_coef, trainer.use_adaptive_entropy = coef, False
    trainer._entropy_bonus_enabled = coef != 0.0
    trainer._last_world_entropy, trainer._entropy_window_stats = float("inf"), None


def compare_with_trl(trainer, rollouts, loss_type, beta, bias_correction_kl, old_given, options=None):
    """TRL's `_compute_loss` + backward per micro-batch vs our sequence_logprobs + grpo_loss:
    per-micro-batch losses, every LoRA gradient and the logged metrics must agree."""
    options = options or {}
    model = trainer.model
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = bias_correction_kl
    _set_trl_options(trainer, options)
    metrics = trainer._metrics["train"]
    metrics.clear()

    # TRL: one _compute_loss + backward per micro-batch, gradients accumulate.
    model.zero_grad(set_to_none=True)
    trl_losses = []
    for mb in MICRO_BATCHES:
        inputs = {k: (v if k == "num_items_in_batch" else v[mb]) for k, v in rollouts.items()}
        if not old_given:
            del inputs["old_per_token_logps"]  # num_iterations == 1: TRL uses per_token_logps.detach()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        trl_losses.append(loss.item())
    trl_grads = lora_grads(model)
    _set_trl_options(trainer, {})

    # Ours: the same micro-batches through sequence_logprobs + grpo_loss.
    model.zero_grad(set_to_none=True)
    input_ids = torch.cat([rollouts["prompt_ids"], rollouts["completion_ids"]], 1)
    attention_mask = torch.cat([rollouts["prompt_mask"], rollouts["completion_mask"]], 1)
    keep = rollouts["completion_ids"].size(1)
    entropy_bonus = options.get("entropy_coef", 0.0) != 0.0
    need_entropy = entropy_bonus or options.get("top_entropy_quantile", 1.0) < 1.0
    our_losses, our_stats = [], []
    for mb in MICRO_BATCHES:
        logps, entropies = sequence_logprobs(model, input_ids[mb], attention_mask[mb], keep, TEMPERATURE,
                                             chunk_size=4, compute_entropy=need_entropy, entropy_grad=entropy_bonus)
        loss, stats = grpo_loss(
            logps,
            rollouts["old_per_token_logps"][mb] if old_given else None,
            rollouts["ref_per_token_logps"][mb],
            rollouts["advantages"][mb],
            rollouts["completion_mask"][mb],
            Objective(
                loss_type=loss_type,
                beta=beta,
                epsilon_low=trainer.epsilon_low,
                max_completion_length=MAX_COMPLETION_LENGTH,
                use_bias_correction_kl=bias_correction_kl,
                **{**DEFAULT_OPTIONS, **options},
            ),
            num_sequences_in_step=input_ids.size(0),
            num_tokens_in_step=float(rollouts["num_items_in_batch"]),
            num_micro_batches=len(MICRO_BATCHES),
            entropies=entropies,
        )
        loss.backward()
        our_losses.append(loss.item())
        our_stats.append(stats)
    our_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)

    assert our_losses == pytest.approx(trl_losses, abs=1e-5), "per-micro-batch loss differs from TRL"
    assert len(trl_grads) == 2 * 7 * 2, "expected lora_A/B on the 7 linears of both layers"
    for name, trl_grad in trl_grads.items():
        assert trl_grad.abs().max() > 0, f"{name}: TRL gradient is zero, the comparison would be vacuous"
        torch.testing.assert_close(our_grads[name], trl_grad, rtol=0, atol=1e-5, msg=f"gradient of {name}")

    compare_logged_metrics(our_stats, metrics, beta)
    return our_stats


def compare_logged_metrics(our_stats, metrics, beta, first_micro_batch=0):
    """TRL appends one value per micro-batch to each metric; ours are per-micro-batch statistics."""
    for mb, ours in enumerate(our_stats, start=first_micro_batch):
        for key, trl_key in [("clip_low_count", "clip_ratio/low_mean"), ("clip_high_count", "clip_ratio/high_mean"),
                             ("clip_region_count", "clip_ratio/region_mean"), ("cispo_clip_count", "cispo_clip_ratio"),
                             ("vespo_phi_sum", "vespo/phi_seq_mean")]:
            value = getattr(ours, key)
            assert (value is not None) == (trl_key in metrics), key
            if value is not None:
                assert (value / ours.ratio_count).item() == pytest.approx(metrics[trl_key][mb], abs=1e-6), key
        # Extremes over the micro-batch's sequences (NaN where none has a token), not means.
        for key, trl_key in [("clip_low_min", "clip_ratio/low_min"), ("clip_high_max", "clip_ratio/high_max")]:
            value = getattr(ours, key)
            assert (value is not None) == (trl_key in metrics), key
            if value is not None:
                assert value.item() == pytest.approx(metrics[trl_key][mb], abs=1e-6, nan_ok=True), key
        if ours.entropy_sum is not None:
            entropy = (ours.entropy_sum / ours.token_count).item()
            assert entropy == pytest.approx(metrics["entropy"][mb], abs=1e-5), "entropy"
        if beta != 0.0:
            assert (ours.kl_sum / ours.token_count).item() == pytest.approx(metrics["kl"][mb], abs=1e-6), "kl"


@pytest.mark.parametrize("old_given", [False, True], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("beta, bias_correction_kl", [(0.0, True), (0.04, True), (0.04, False)],
                         ids=["beta0", "beta0.04", "beta0.04-no_kl_correction"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_and_lora_gradients_match_trl(trainer, rollouts, loss_type, beta, bias_correction_kl, old_given):
    stats = compare_with_trl(trainer, rollouts, loss_type, beta, bias_correction_kl, old_given)
    if old_given:  # sanity: the off-policy case really exercises clipping, and the extremes differ
        assert sum(s.clip_region_count for s in stats) > 0
        assert any(s.clip_high_max > 0 for s in stats) or any(s.clip_low_min > 0 for s in stats)


# Every other objective and loss-shaping option of TRL 1.16 that applies without vLLM, with
# non-default parameters so that one read from the wrong place shows. (Checked: off-policy, each
# case fails when our side ignores its options; on-policy some coincide by design, e.g. a ratio
# of exactly 1 is never clipped.)
OBJECTIVES = {
    "cispo": ("cispo", {"epsilon_high": 1.1}),
    "sapo": ("sapo", {"sapo_temperature_pos": 0.9, "sapo_temperature_neg": 1.3}),
    "luspo": ("luspo", {"importance_sampling_level": "sequence"}),
    "luspo-token": ("luspo", {}),
    "vespo": ("vespo", {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.5}),
    "gspo": ("grpo", {"importance_sampling_level": "sequence"}),
    "gspo-dapo": ("dapo", {"importance_sampling_level": "sequence"}),
    "delta": ("dapo", {"delta": 1.05}),
    "top_entropy": ("dapo", {"top_entropy_quantile": 0.3}),
    "off_policy_mask": ("grpo", {"off_policy_mask_threshold": 0.02}),
    "entropy_coef": ("bnpo", {"entropy_coef": 0.05}),
    "entropy_coef-top_entropy": ("dr_grpo", {"entropy_coef": 0.05, "top_entropy_quantile": 0.5}),
}


@pytest.mark.parametrize("old_given", [False, True], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
@pytest.mark.parametrize("case", list(OBJECTIVES))
def test_every_trl_objective_matches(trainer, rollouts, case, beta, old_given):
    loss_type, options = OBJECTIVES[case]
    compare_with_trl(trainer, rollouts, loss_type, beta, True, old_given, options)


# Entropy targets step by step: the entropy of this near-uniform tiny model (about 4 nats) is
# below the first three, above the next two, below the last. So the coefficient rises, is held
# at entropy_coef_max, falls, and the bonus is applied (steps 2, 3, 6) or gated off (1: no
# measurement yet; 4, 5: the last entropy was above the target).
ENTROPY_TARGETS = [10.0, 10.0, 10.0, 0.1, 0.1, 10.0]
CONTROLLER = dict(entropy_coef=0.02, entropy_coef_delta=0.01, entropy_coef_min=0.005, entropy_coef_max=0.04)


@pytest.mark.parametrize("loss_type, options", [("dapo", {}), ("grpo", {"top_entropy_quantile": 0.5})],
                         ids=["dapo", "grpo-top_entropy"])
def test_adaptive_entropy_control_matches_trl(trainer, rollouts, loss_type, options):
    """Six optimizer steps of two micro-batches with use_adaptive_entropy: TRL's own controller
    (inside its `_compute_loss`, stepping where accelerate says the gradients sync) against
    ours: per-micro-batch losses and LoRA gradients, the coefficient after each step, the last
    measured entropy and the logged `entropy_coef`."""
    from lowvram_grpo.entropy_control import EntropyControl

    model = trainer.model
    trainer.loss_type, trainer.beta = loss_type, 0.04
    trainer.args.use_bias_correction_kl = True
    _set_trl_options(trainer, options)
    trainer.entropy_coef, trainer.use_adaptive_entropy = CONTROLLER["entropy_coef"], True
    trainer._entropy_bonus_enabled = True  # as TRL sets it for use_adaptive_entropy
    for key in ("entropy_coef_delta", "entropy_coef_min", "entropy_coef_max"):
        setattr(trainer.args, key, CONTROLLER[key])
    ours = EntropyControl(coef=CONTROLLER["entropy_coef"], adaptive=True, delta=CONTROLLER["entropy_coef_delta"],
                          coef_min=CONTROLLER["entropy_coef_min"], coef_max=CONTROLLER["entropy_coef_max"])
    input_ids = torch.cat([rollouts["prompt_ids"], rollouts["completion_ids"]], 1)
    attention_mask = torch.cat([rollouts["prompt_mask"], rollouts["completion_mask"]], 1)
    keep = rollouts["completion_ids"].size(1)
    metrics = trainer._metrics["train"]
    metrics.clear()
    applied, trl_coefs, our_coefs = [], [], []
    try:
        for step, target in enumerate(ENTROPY_TARGETS):
            trainer.args.entropy_target = ours.target = target

            # TRL: its controller updates at the micro-batch where the gradients sync (the last).
            model.zero_grad(set_to_none=True)
            trl_losses = []
            for i, mb in enumerate(MICRO_BATCHES):
                trainer.accelerator.gradient_state._set_sync_gradients(i == len(MICRO_BATCHES) - 1)
                loss = trainer._compute_loss(model, {k: (v if k == "num_items_in_batch" else v[mb])
                                                     for k, v in rollouts.items()})
                loss.backward()
                trl_losses.append(loss.item())
            trl_grads = lora_grads(model)
            trl_coefs.append((trainer.entropy_coef, trainer._last_world_entropy))

            # Ours: the step's coefficient, then the update from the step's bonus-token entropy.
            model.zero_grad(set_to_none=True)
            coef = ours.applied_coef()
            applied.append(coef)
            our_losses, our_stats = [], []
            for mb in MICRO_BATCHES:
                logps, entropies = sequence_logprobs(model, input_ids[mb], attention_mask[mb], keep, TEMPERATURE,
                                                     chunk_size=4, compute_entropy=True, entropy_grad=coef != 0.0)
                loss, stats = grpo_loss(
                    logps, rollouts["old_per_token_logps"][mb], rollouts["ref_per_token_logps"][mb],
                    rollouts["advantages"][mb], rollouts["completion_mask"][mb],
                    Objective(loss_type=loss_type, beta=0.04, epsilon_low=trainer.epsilon_low,
                              max_completion_length=MAX_COMPLETION_LENGTH, entropy_coef=coef,
                              **{**DEFAULT_OPTIONS, **options}),
                    num_sequences_in_step=input_ids.size(0), num_tokens_in_step=float(rollouts["num_items_in_batch"]),
                    num_micro_batches=len(MICRO_BATCHES), entropies=entropies)
                loss.backward()
                our_losses.append(loss.item())
                our_stats.append(stats)
            ours.update(float(sum(s.bonus_entropy_sum for s in our_stats) /
                              sum(s.bonus_token_count for s in our_stats)))
            our_coefs.append((ours.coef, ours.last_world_entropy))

            assert our_losses == pytest.approx(trl_losses, abs=1e-5), f"step {step + 1}: loss"
            for name, trl_grad in trl_grads.items():
                torch.testing.assert_close(lora_grads(model)[name], trl_grad, rtol=0, atol=1e-5,
                                           msg=f"step {step + 1}: gradient of {name}")
            compare_logged_metrics(our_stats, metrics, 0.04, first_micro_batch=2 * step)
    finally:
        trainer.accelerator.gradient_state._set_sync_gradients(True)
        trainer.args.entropy_target = 0.2
        _set_trl_options(trainer, {})
        model.zero_grad(set_to_none=True)

    assert [c for c, _ in our_coefs] == pytest.approx([c for c, _ in trl_coefs], abs=1e-12)
    assert [e for _, e in our_coefs] == pytest.approx([e for _, e in trl_coefs], abs=1e-5)
    assert metrics["entropy_coef"] == pytest.approx([c for c, _ in our_coefs], abs=1e-12), "one value per step"
    # The trajectory is the one the targets were chosen for (so the comparison is not vacuous).
    assert [c for c, _ in our_coefs] == pytest.approx([0.03, 0.04, 0.04, 0.03, 0.02, 0.03])
    assert applied == pytest.approx([0.0, 0.03, 0.04, 0.0, 0.0, 0.02])


def test_logprobs_and_entropy_match_trl(trainer, rollouts):
    """Our chunked head vs TRL's fused LM head kernel, temperature != 1, padding on both sides."""
    input_ids = torch.cat([rollouts["prompt_ids"], rollouts["completion_ids"]], 1)
    attention_mask = torch.cat([rollouts["prompt_mask"], rollouts["completion_mask"]], 1)
    keep = rollouts["completion_ids"].size(1)
    mask = rollouts["completion_mask"].bool()
    with torch.no_grad():
        trl_logps, trl_entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, keep, compute_entropy=True)
        ours, entropy = sequence_logprobs(trainer.model, input_ids, attention_mask, keep, TEMPERATURE,
                                          chunk_size=5, compute_entropy=True)
    # TRL writes 0 at padded completion positions; ours has a (meaningless) value there. Compare real tokens.
    torch.testing.assert_close(ours[mask], trl_logps[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[mask], trl_entropy[mask], rtol=0, atol=1e-5)


def trl_sum_then_normalize(rewards, num_generations, scale_rewards):
    """TRL 1.16 `_generate_and_score_completions`, multi_objective_aggregation="sum_then_normalize".

    Copied verbatim (single reward function, so `rewards` is already the weighted sum with NaN for
    unscorable rows): the code is inline in a method that generates and scores, so it cannot be
    called on its own. `nanstd` is TRL's own.
    """
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std_rewards


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
def test_advantages_match_trl(scale_rewards, num_generations):
    nan = float("nan")
    rewards = torch.tensor([
        0.3, 1.7, nan, 0.9,  # one unscorable completion
        nan, nan, nan, nan,  # a fully unscorable group
        2.0, 2.0, 2.0, 2.0,  # zero spread
        nan, 5.0, nan, nan,  # a single scorable completion: std is NaN
        -1.0, 4.0, 0.5, 0.25,
    ])
    ours, our_std = group_advantages(rewards, num_generations, scale_rewards)
    expected, expected_std = trl_sum_then_normalize(rewards, num_generations, scale_rewards)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(our_std, expected_std, rtol=0, atol=0, equal_nan=True)
    assert not ours.isnan().any()


def trl_normalize_then_sum(rewards_per_func, weights, num_generations):
    """TRL 1.16 `_generate_and_score_completions`, multi_objective_aggregation="normalize_then_sum",
    copied verbatim (inline there, so it cannot be called on its own)."""
    from trl.trainer.utils import nanstd

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.size(1))
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = (grouped - mean_k) / (std_k + 1e-4)
    reward_k = reward_k.view(-1, rewards_per_func.size(1))
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std_rewards


@pytest.mark.parametrize("num_generations", [2, 4])
def test_normalize_then_sum_advantages_match_trl(num_generations):
    nan = float("nan")
    per_function = torch.tensor([  # a 0/1 correctness reward and a small-scale format reward
        [1.0, 0.25], [0.0, 0.5], [nan, 0.0], [1.0, nan],
        [nan, nan], [0.0, 0.75], [0.0, 0.75], [0.0, 0.75],
        [1.0, 0.1], [1.0, 0.2], [0.0, 0.3], [1.0, 0.4],
    ])
    weights = torch.tensor([1.0, 0.5])
    ours, our_std = normalize_then_sum_advantages(per_function, weights, num_generations)
    expected, expected_std = trl_normalize_then_sum(per_function, weights, num_generations)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(our_std, expected_std, rtol=0, atol=0)


def test_4bit_base_with_adapter_disabled_matches_naive_logprobs(tmp_path):
    """QLoRA path: NF4 double-quant base + LoRA; disable_adapter() must give the 4-bit base's log-probs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    from lowvram_grpo.quantization import set_cpu_inference_packing

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit", "the base must really be 4-bit"
    set_cpu_inference_packing(base, inference_only=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))

    input_ids = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    keep = 6
    with torch.no_grad(), model.disable_adapter():
        ours, _ = sequence_logprobs(model, input_ids, attention_mask, keep, TEMPERATURE, chunk_size=5)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1]
        naive = torch.log_softmax(logits.float() / TEMPERATURE, -1).gather(-1, input_ids[:, -keep:, None]).squeeze(-1)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-5)

    with torch.no_grad():
        lora_logps, _ = sequence_logprobs(model, input_ids, attention_mask, keep, TEMPERATURE)
    assert (lora_logps - ours).abs().max() > 1e-2, "with the adapter enabled the log-probs must change"
    # And gradients reach the LoRA weights through the 4-bit layers and the checkpointed head.
    lora_logps, _ = sequence_logprobs(model, input_ids, attention_mask, keep, TEMPERATURE, chunk_size=5)
    lora_logps.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


# Tool results spliced into completions (multi-turn rollouts): 0 in the tool mask. They stay in
# the attention, but TRL leaves them out of the loss, its normalisers, the KL and the entropy.
TOOL_RESULT_SPANS = {0: (1, 3), 1: (2, 5), 2: (0, 2), 4: (3, 6), 5: (4, 6)}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"])
def test_tool_masked_loss_matches_trl(trainer, rollouts, loss_type):
    """Our update's path for a multi-turn rollout (a Rollout with a tool_mask, cut into
    micro-batches by update.micro_batches, loss on Rollout.loss_mask) against TRL's
    `_compute_loss` given the same `tool_mask`: losses, LoRA gradients, KL and entropy."""
    from lowvram_grpo.rollout import Rollout
    from lowvram_grpo.update import micro_batches

    tool_mask = torch.ones_like(rollouts["completion_mask"])
    for row, (start, end) in TOOL_RESULT_SPANS.items():
        tool_mask[row, start:end] = 0
    loss_mask = rollouts["completion_mask"] * tool_mask
    options = {"epsilon_high": 1.1} if loss_type == "cispo" else {}
    model = trainer.model
    trainer.loss_type, trainer.beta = loss_type, 0.04
    trainer.args.use_bias_correction_kl = True
    _set_trl_options(trainer, options)
    metrics = trainer._metrics["train"]
    metrics.clear()
    trl_inputs = {**rollouts, "tool_mask": tool_mask, "num_items_in_batch": loss_mask.sum()}
    model.zero_grad(set_to_none=True)
    trl_losses = []
    for mb in MICRO_BATCHES:
        loss = trainer._compute_loss(model, {k: (v if k == "num_items_in_batch" else v[mb]) for k, v in trl_inputs.items()})
        loss.backward()
        trl_losses.append(loss.item())
    trl_grads = lora_grads(model)
    _set_trl_options(trainer, {})

    rollout = Rollout(prompt_ids=rollouts["prompt_ids"], prompt_mask=rollouts["prompt_mask"],
                      completion_ids=rollouts["completion_ids"], completion_mask=rollouts["completion_mask"],
                      completions=[""] * 6, is_clipped=torch.zeros(6, dtype=torch.bool), num_prompts_truncated=0,
                      tool_mask=tool_mask)
    model.zero_grad(set_to_none=True)
    our_losses, our_stats = [], []
    for mb in micro_batches(rollout, 3, torch.device("cpu")):  # the two micro-batches of MICRO_BATCHES
        logps, entropies = sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.logits_to_keep, TEMPERATURE,
                                             chunk_size=4, compute_entropy=True)
        loss, stats = grpo_loss(
            logps, rollouts["old_per_token_logps"][mb.rows, :mb.logits_to_keep],
            rollouts["ref_per_token_logps"][mb.rows, :mb.logits_to_keep], rollouts["advantages"][mb.rows],
            mb.completion_mask,
            Objective(loss_type=loss_type, beta=0.04, epsilon_low=trainer.epsilon_low,
                      max_completion_length=MAX_COMPLETION_LENGTH, **{**DEFAULT_OPTIONS, **options}),
            num_sequences_in_step=6, num_tokens_in_step=float(rollout.loss_mask.sum()),
            num_micro_batches=len(MICRO_BATCHES), entropies=entropies)
        loss.backward()
        our_losses.append(loss.item())
        our_stats.append(stats)
    our_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)

    assert our_losses == pytest.approx(trl_losses, abs=1e-5), "per-micro-batch loss differs from TRL"
    for name, trl_grad in trl_grads.items():
        assert trl_grad.abs().max() > 0, f"{name}: TRL gradient is zero, the comparison would be vacuous"
        torch.testing.assert_close(our_grads[name], trl_grad, rtol=0, atol=1e-5, msg=f"gradient of {name}")
    compare_logged_metrics(our_stats, metrics, beta=0.04)
    # The tool results really are out of the loss: the same rollout without a tool mask differs.
    assert sum(float(s.token_count) for s in our_stats) == float(loss_mask.sum()) < float(
        rollouts["completion_mask"].sum())
