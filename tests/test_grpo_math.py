"""Behaviour of the GRPO math in lowvram_grpo/grpo.py, on small hand-made tensors and tiny models.

The exact agreement with TRL is tests/test_grpo_oracle.py's job; these tests pin down the
properties the algorithm relies on, so a failure says *which* property broke.
"""

import math

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lowvram_grpo.grpo import Objective, group_advantages, grpo_loss
from lowvram_grpo.logprobs import sequence_logprobs

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------


def test_advantages_are_zero_mean_unit_std_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 0.0, 5.0, 5.0])
    adv, std = group_advantages(rewards, num_generations=4)
    for group in adv.view(2, 4):
        assert abs(group.mean().item()) < 1e-6, "advantages must be zero-mean within each group"
        assert abs(group.std().item() - 1.0) < 1e-3, "group scaling must give (almost) unit std"
    assert torch.allclose(std[:4], torch.full((4,), torch.tensor([1.0, 2, 3, 4]).std().item()))


def test_constant_group_gets_zero_advantage_and_zero_std():
    adv, std = group_advantages(torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.0]), num_generations=3)
    assert torch.equal(adv[:3], torch.zeros(3)), "no spread in a group -> no learning signal"
    assert torch.equal(std[:3], torch.zeros(3)), "reward_std must be 0 for a constant group (frac_reward_zero_std)"
    assert (adv[3:] != 0).all()


def test_nan_rewards_get_zero_advantage_and_are_left_out_of_the_baseline():
    adv, _ = group_advantages(torch.tensor([1.0, NAN, 3.0, 5.0]), num_generations=4, scale_rewards="none")
    # Baseline is mean(1, 3, 5) = 3, not mean(1, 0, 3, 5) = 2.25 as it would be if NaN counted as 0.
    assert torch.equal(adv, torch.tensor([-2.0, 0.0, 0.0, 2.0]))


def test_all_nan_group_gives_zeros_not_nan():
    adv, _ = group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0]), num_generations=2)
    assert not adv.isnan().any()
    assert torch.equal(adv[:2], torch.zeros(2))


def test_scale_rewards_none_is_plain_mean_centering():
    adv, _ = group_advantages(torch.tensor([0.0, 10.0, 1.0, 3.0]), num_generations=2, scale_rewards="none")
    assert torch.equal(adv, torch.tensor([-5.0, 5.0, -1.0, 1.0]))


def test_scale_rewards_batch_divides_by_the_batch_std():
    rewards = torch.tensor([0.0, 10.0, 1.0, 3.0])
    adv, std = group_advantages(rewards, num_generations=2, scale_rewards="batch")
    expected = torch.tensor([-5.0, 5.0, -1.0, 1.0]) / (rewards.std() + 1e-4)
    assert torch.allclose(adv, expected)
    assert torch.allclose(std, rewards.std().expand(4)), "batch mode reports the batch std"


def test_single_generation_groups_have_zero_advantage():
    adv, std = group_advantages(torch.tensor([1.0, 2.0, 3.0]), num_generations=1)
    assert torch.equal(adv, torch.zeros(3)) and torch.equal(std, torch.zeros(3))


def test_advantage_argument_validation():
    with pytest.raises(ValueError, match="group.*batch.*none"):
        group_advantages(torch.zeros(4), 2, scale_rewards="global")
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 2)


# ---------------------------------------------------------------------------------------------
# grpo_loss
# ---------------------------------------------------------------------------------------------


STEP_KEYS = ("num_sequences_in_step", "num_tokens_in_step", "num_micro_batches")


def loss_kwargs(**overrides):
    """grpo_loss's keywords: the Objective and the step's counts."""
    kwargs = dict(loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=4,
                  num_sequences_in_step=2, num_tokens_in_step=5.0, num_micro_batches=1)
    kwargs = {**kwargs, **overrides}
    step = {key: kwargs.pop(key) for key in STEP_KEYS}
    return {"objective": Objective(**kwargs), **step}


MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # 3 + 2 = 5 real tokens


def test_on_policy_grpo_loss_is_minus_mean_advantage_and_gradient_flows():
    logps = torch.full((2, 4), -1.0, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(logps, None, None, adv, MASK, **loss_kwargs())
    assert math.isclose(loss.item(), -(2.0 - 1.0) / 2, abs_tol=1e-6), "ratio is 1, so loss = -mean(A)"
    loss.backward()
    # d/dlogp of -ratio*A / (len * num_seqs) with d ratio / d logp = 1 at ratio 1.
    expected = -adv[:, None] * MASK / (MASK.sum(-1, keepdim=True) * 2)
    assert torch.allclose(logps.grad, expected), "old_logps=None must still give the policy gradient"


def test_clipping_stops_the_gradient_only_where_it_is_pessimistic():
    old = torch.zeros(4, 1)
    # ratio = exp(logp - old): 1.5 (above 1 + eps), 0.5 (below 1 - eps)
    logps = torch.log(torch.tensor([[1.5], [0.5], [1.5], [0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    mask = torch.ones(4, 1)
    loss, stats = grpo_loss(logps, old, None, adv, mask, **loss_kwargs(num_sequences_in_step=4))
    loss.backward()
    grad = logps.grad.squeeze(1)
    assert grad[0] == 0 and grad[1] == 0, "A>0 & ratio>1+eps, A<0 & ratio<1-eps: clipped, no gradient"
    assert grad[2] != 0 and grad[3] != 0, "moving back towards the old policy is never clipped"
    assert stats.clip_high_count == 1 and stats.clip_low_count == 1 and stats.clip_region_count == 2


def test_asymmetric_clip_range():
    logps = torch.log(torch.tensor([[1.25]])).requires_grad_()
    kw = loss_kwargs(num_sequences_in_step=1)
    _, stats = grpo_loss(logps, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1), **kw)
    assert stats.clip_high_count == 1, "1.25 > 1 + 0.2"
    kw = loss_kwargs(num_sequences_in_step=1, epsilon_high=0.28)  # DAPO's clip-higher
    _, stats = grpo_loss(logps, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1), **kw)
    assert stats.clip_high_count == 0, "1.25 < 1 + 0.28"


def test_k3_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logps = torch.randn(2, 4).requires_grad_()
    loss0, _ = grpo_loss(logps, None, None, torch.zeros(2), MASK, **loss_kwargs())
    loss, stats = grpo_loss(logps, None, logps.detach(), torch.zeros(2), MASK, **loss_kwargs(beta=0.1))
    assert stats.kl_sum == 0 and loss.item() == loss0.item() == 0
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros(2, 4)), "KL gradient vanishes at the reference"
    _, stats = grpo_loss(logps, None, logps.detach() + 0.3, torch.zeros(2), MASK, **loss_kwargs(beta=0.1))
    assert stats.kl_sum > 0


def test_padding_positions_never_reach_the_loss_or_gradient():
    logps = torch.randn(2, 4)
    garbage = logps.clone()
    garbage[MASK == 0] = 1e4  # would overflow exp() to inf if it were not masked out first
    results = []
    for lp in (logps, garbage):
        lp = lp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1.0, -1.0]), MASK,
                                **loss_kwargs(beta=0.04))
        loss.backward()
        results.append((loss, lp.grad, stats.kl_sum))
    (loss_a, grad_a, kl_a), (loss_b, grad_b, kl_b) = results
    assert torch.isfinite(loss_b) and torch.isfinite(grad_b).all()
    assert loss_a == loss_b and torch.equal(grad_a, grad_b) and kl_a == kl_b
    assert (grad_b[MASK == 0] == 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_split_gives_the_same_step_loss(loss_type):
    """grpo, dr_grpo and dapo normalise by step-level counts, so splitting the step is exact."""
    torch.manual_seed(0)
    logps, old, ref = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    adv = torch.randn(4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    kw = loss_kwargs(loss_type=loss_type, beta=0.04, max_completion_length=5, num_sequences_in_step=4,
                     num_tokens_in_step=float(mask.sum()))
    whole, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "num_micro_batches": 1})
    parts = [grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], **{**kw, "num_micro_batches": 2})[0]
             for s in (slice(0, 1), slice(1, 4))]
    assert torch.allclose(whole, sum(parts), atol=1e-6)


def test_aggregation_formulas_by_hand():
    logps = torch.zeros(2, 4)
    adv = torch.tensor([1.0, 3.0])  # on-policy, beta 0: per-token loss is -A
    kw = dict(max_completion_length=10, num_sequences_in_step=4, num_tokens_in_step=20.0, num_micro_batches=2)
    expected = {
        "grpo": (-1.0 - 3.0) / 4,  # per-sequence means, over all 4 sequences of the step
        "bnpo": (-1.0 * 3 - 3.0 * 2) / 5 / 2,  # token mean of this micro-batch, / micro-batches
        "dr_grpo": (-1.0 * 3 - 3.0 * 2) / (4 * 10),  # / (sequences * max_completion_length)
        "dapo": (-1.0 * 3 - 3.0 * 2) / 20,  # / tokens in the step
    }
    for loss_type, value in expected.items():
        loss, stats = grpo_loss(logps, None, None, adv, MASK, **loss_kwargs(**kw, loss_type=loss_type))
        assert math.isclose(loss.item(), value, rel_tol=1e-6), f"{loss_type}: {loss.item()} != {value}"
        assert stats.token_count == 5


def test_loss_argument_validation():
    args = (torch.zeros(2, 4), None, None, torch.zeros(2), MASK)
    with pytest.raises(ValueError, match="grpo.*dr_grpo.*dapo.*bnpo.*cispo.*sapo.*luspo.*vespo"):
        grpo_loss(*args, **loss_kwargs(loss_type="ppo"))
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(*args, **loss_kwargs(beta=0.1))


# ---------------------------------------------------------------------------------------------
# sequence_logprobs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 64, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left-padded prompt
    attention_mask[2, -2:] = 0  # right-padded completion
    return input_ids, attention_mask


def naive_logprobs(model, input_ids, attention_mask, keep, temperature):
    """The obvious implementation: full (B, T, V) logits, then log_softmax."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, input_ids[:, -keep:, None]).squeeze(-1), entropy


def test_chunked_logprobs_and_entropy_equal_naive(tiny_model, batch):
    with torch.no_grad():
        ours, entropy = sequence_logprobs(tiny_model, *batch, logits_to_keep=6, temperature=0.7, chunk_size=4,
                                          compute_entropy=True)
        naive, naive_entropy = naive_logprobs(tiny_model, *batch, keep=6, temperature=0.7)
    assert ours.shape == (3, 6) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy, rtol=0, atol=1e-5)


def test_chunk_size_does_not_change_the_result(tiny_model, batch):
    with torch.no_grad():
        results = [sequence_logprobs(tiny_model, *batch, logits_to_keep=6, chunk_size=c)[0] for c in (1, 5, 7, 256)]
    for chunk_size, result in zip((5, 7, 256), results[1:]):
        # Not bit-identical: the head matmul's blocking depends on the row count.
        torch.testing.assert_close(result, results[0], rtol=0, atol=1e-6, msg=f"chunk_size={chunk_size}")


def test_chunked_gradients_equal_naive_gradients(tiny_model, batch):
    weights = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))

    def grads(fn):
        tiny_model.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    ours = grads(lambda: sequence_logprobs(tiny_model, *batch, logits_to_keep=6, temperature=0.7, chunk_size=4)[0])
    naive = grads(lambda: naive_logprobs(tiny_model, *batch, keep=6, temperature=0.7)[0])
    tiny_model.zero_grad(set_to_none=True)
    assert ours.keys() == naive.keys() and len(ours) > 0
    for name in naive:
        torch.testing.assert_close(ours[name], naive[name], rtol=0, atol=1e-5, msg=name)


def test_entropy_under_grad_does_not_change_the_gradient(tiny_model, batch):
    def grads(compute_entropy):
        tiny_model.zero_grad(set_to_none=True)
        logps, entropy = sequence_logprobs(tiny_model, *batch, logits_to_keep=6, chunk_size=4,
                                           compute_entropy=compute_entropy)
        logps.sum().backward()
        return entropy, {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    entropy, with_entropy = grads(True)
    _, without = grads(False)
    tiny_model.zero_grad(set_to_none=True)
    assert entropy is not None and not entropy.requires_grad, "entropy is a metric, it must not carry a graph"
    for name in without:
        torch.testing.assert_close(with_entropy[name], without[name], rtol=0, atol=0, msg=name)


def test_lm_head_never_sees_more_than_chunk_size_rows(tiny_model, batch):
    seen = []
    hook = tiny_model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    try:
        logps, _ = sequence_logprobs(tiny_model, *batch, logits_to_keep=6, chunk_size=4)
        calls_in_forward = len(seen)
        logps.sum().backward()
    finally:
        hook.remove()
        tiny_model.zero_grad(set_to_none=True)
    assert calls_in_forward == math.ceil(3 * 6 / 4)
    assert len(seen) == 2 * calls_in_forward, "backward must recompute each chunk (checkpointing)"
    assert all(shape[0] <= 4 for shape in seen), f"full logits materialised: {seen}"


def test_no_graph_under_no_grad(tiny_model, batch):
    with torch.no_grad():
        logps, entropy = sequence_logprobs(tiny_model, *batch, logits_to_keep=6)
    assert not logps.requires_grad and entropy is None


@pytest.mark.parametrize(
    "model_cls, config",
    [
        (Gemma2ForCausalLM, Gemma2Config(**TINY, head_dim=16, final_logit_softcapping=0.5)),
        (CohereForCausalLM, CohereConfig(**TINY, logit_scale=3.0)),
        (GraniteForCausalLM, GraniteConfig(**TINY, logits_scaling=0.25)),
    ],
    ids=["softcapping", "logit_scale", "logits_scaling"],
)
def test_logit_transforms_of_the_model_are_applied(model_cls, config):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    input_ids = torch.randint(3, 64, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        ours, _ = sequence_logprobs(model, input_ids, attention_mask, logits_to_keep=4, temperature=0.7)
        naive, _ = naive_logprobs(model, input_ids, attention_mask, keep=4, temperature=0.7)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-5)


def test_peft_adapter_is_active_and_can_be_disabled(batch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    with torch.no_grad():
        base_logps, _ = naive_logprobs(base, *batch, keep=6, temperature=1.0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        lora_logps, _ = sequence_logprobs(model, *batch, logits_to_keep=6)
        with model.disable_adapter():
            ref_logps, _ = sequence_logprobs(model, *batch, logits_to_keep=6)
    torch.testing.assert_close(ref_logps, base_logps, rtol=0, atol=1e-5, msg="disable_adapter() must give the base")
    assert (lora_logps - base_logps).abs().max() > 1e-2, "the LoRA adapter must be active by default"
