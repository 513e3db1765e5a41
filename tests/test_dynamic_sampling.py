"""Dynamic sampling (`zero_std_groups`): groups whose rewards are all equal carry no policy gradient.

- skip: those groups leave the log-prob and backward passes, and with beta=0 the update is the
  one `keep` makes (same normalisers, the skipped groups add exactly zero); the saving is logged.
- resample: fresh prompts are drawn until the step has prompts_per_step informative groups, or
  max_resample_rounds ran out (then uninformative groups fill the step and are skipped).
"""

import pytest
import torch
from conftest import sgd_learner

from lowvram_grpo.config import RewardSpec, load_config
from lowvram_grpo.data import load_prompt_data
from lowvram_grpo.model import load_policy
from lowvram_grpo.rewards.loading import load_reward_functions
from lowvram_grpo.sampling import PromptSampler
from lowvram_grpo.trainer import grpo_step, seed_everything

CPU = torch.device("cpu")


def odd_length_if_even_answer(prompts, completions, answer, **kwargs):
    """Varies within a group only for prompts with an even answer: the others are all 0.0."""
    return [float(len(c) % 2) if int(a) % 2 == 0 else 0.0 for c, a in zip(completions, answer)]


def always_zero(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def _setup(tmp_path, reward=odd_length_if_even_answer, **overrides):
    config = load_config(preset="tiny-cpu", overrides={"output_dir": str(tmp_path / "unused"), "beta": 0.0,
                                                       "max_grad_norm": 1e6, **overrides})
    config.rewards = [RewardSpec(reward)]
    seed_everything(0)
    policy, tokenizer = load_policy(config, CPU)
    with torch.no_grad():  # LoRA B starts at zero; a random one gives every LoRA weight a gradient
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows = load_prompt_data(config, tokenizer).train
    return config, policy, tokenizer, rows, load_reward_functions(config.rewards)


def _one_step(config, policy, tokenizer, rows, reward_functions, start):
    """One grpo_step from the LoRA weights `start`, with SGD(lr=1): the weight change is the gradient."""
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    learner = sgd_learner(config, policy, start, tokenizer, reward_functions)
    seed_everything(1)  # the same rollouts for every mode
    record, _ = grpo_step(learner, rows, PromptSampler(len(rows), 0), step=1)
    return record, {n: (p.detach() - start[n]) for n, p in params.items()}


@pytest.mark.parametrize("overrides", [{"loss_type": "dapo"}, {"loss_type": "grpo"}, {"loss_type": "dr_grpo"},
                                       {"loss_type": "luspo", "importance_sampling_level": "sequence"},
                                       {"loss_type": "cispo", "epsilon_high": 5.0},
                                       {"loss_type": "dapo", "mask_truncated_completions": True}],
                         ids=lambda o: "-".join(str(v) for v in o.values()))
def test_skip_with_beta0_makes_the_keep_update(tiny_cache, tmp_path, overrides):
    config, policy, tokenizer, rows, rewards = _setup(tmp_path, **overrides)
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    keep, keep_update = _one_step(config, policy, tokenizer, rows, rewards, start)
    config.zero_std_groups = "skip"
    skip, skip_update = _one_step(config, policy, tokenizer, rows, rewards, start)

    assert 0 < keep["frac_reward_zero_std"] < 1, "the step needs both kinds of group, else this shows nothing"
    assert skip["dynamic_sampling/skipped_groups"] == round(keep["frac_reward_zero_std"] * config.prompts_per_step)
    assert 0 < skip["dynamic_sampling/skipped_token_fraction"] < 1
    assert skip["reward"] == keep["reward"] and skip["loss"] == pytest.approx(keep["loss"], abs=1e-6)
    for name, change in keep_update.items():
        assert change.abs().max() > 0, f"{name} did not move"
        torch.testing.assert_close(skip_update[name], change, rtol=1e-5, atol=1e-7, msg=name)


def test_resample_fills_the_step_with_informative_groups(tiny_cache, tmp_path):
    config, policy, tokenizer, rows, rewards = _setup(tmp_path, zero_std_groups="resample", max_resample_rounds=8)
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    record, update = _one_step(config, policy, tokenizer, rows, rewards, start)
    # About half the prompts have an odd answer (all-zero rewards): one round cannot fill the step.
    assert record["dynamic_sampling/resample_rounds"] >= 1
    assert record["dynamic_sampling/resampled_groups"] == record["dynamic_sampling/resample_rounds"] * 8
    assert record["dynamic_sampling/informative_groups"] == config.prompts_per_step
    assert record["frac_reward_zero_std"] == 0.0, "every group trained on is informative"
    assert record["dynamic_sampling/extra_generation_time"] > 0
    assert record["generation_time"] >= record["dynamic_sampling/extra_generation_time"]
    assert any(change.abs().max() > 0 for change in update.values())


def test_resample_gives_up_after_max_rounds_and_still_steps(tiny_cache, tmp_path):
    config, policy, tokenizer, rows, rewards = _setup(tmp_path, always_zero, zero_std_groups="resample",
                                                      max_resample_rounds=2)
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    record, update = _one_step(config, policy, tokenizer, rows, rewards, start)
    assert record["dynamic_sampling/resample_rounds"] == 2
    assert record["dynamic_sampling/informative_groups"] == 0
    # The step is filled with uninformative groups, which the update then skips.
    assert record["dynamic_sampling/skipped_groups"] == config.prompts_per_step
    assert record["step_skipped"] == 0 and record["grad_norm"] == 0.0
    assert all(change.abs().max() == 0 for change in update.values()), "nothing informative: a zero update"
