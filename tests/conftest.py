"""Shared test setup.

- bitsandbytes imported without its run-time kernel lookup (see lowvram_grpo/quantization.py).
- One thread for torch: on small CPU machines, handing the tiny models' small matrices
  between threads costs far more than the arithmetic (seen: 16 ms instead of 30 us per matmul).
- One built-in tiny model for the whole session, in a temporary cache that subprocesses
  (CLI tests) find through LOWVRAM_GRPO_CACHE.
- `fixed_step`: one GRPO step's inputs made once, for tests of the update on fixed rollouts.
"""

import json
import os

import pytest
import torch

from lowvram_grpo.quantization import import_bitsandbytes

torch.set_num_threads(1)
# Before any test module imports bitsandbytes: imported bare, it asks the Hub for a CPU kernel.
import_bitsandbytes()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lowvram_grpo_cache")
    previous = os.environ.get("LOWVRAM_GRPO_CACHE")
    os.environ["LOWVRAM_GRPO_CACHE"] = str(cache)
    from lowvram_grpo.builtin.tiny_model import tiny_model_path

    tiny_model_path()  # build once, before any test or subprocess needs it
    yield cache
    if previous is None:
        os.environ.pop("LOWVRAM_GRPO_CACHE", None)
    else:
        os.environ["LOWVRAM_GRPO_CACHE"] = previous


@pytest.fixture
def tiny_path(tiny_cache):
    from lowvram_grpo.builtin.tiny_model import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def demo_run(tiny_cache, tmp_path_factory):
    """The tiny-cpu preset exactly as users run it, trained once for every test that reads it:
    (its config, its final adapter directory)."""
    from lowvram_grpo.config import load_config
    from lowvram_grpo.trainer import train

    config = load_config(preset="tiny-cpu", overrides={"output_dir": str(tmp_path_factory.mktemp("demo") / "run")})
    result = train(config, progress=False)
    assert result.finished and result.step == config.max_steps
    return config, result.adapter


def fixed_step(config, num_prompts: int, num_generations: int):
    """A policy whose LoRA differs from the reference (random LoRA B, so every LoRA weight gets a
    gradient), one step's rollouts of `num_prompts` x `num_generations`, random rewards, their
    group advantages and the reference log-probs. Seeded: the same every call."""
    from lowvram_grpo import grpo
    from lowvram_grpo.data import load_prompt_data
    from lowvram_grpo.model import load_policy, reference_model
    from lowvram_grpo.planning.planner import resolve_chunking
    from lowvram_grpo.rollout import generate_rollouts
    from lowvram_grpo.trainer import seed_everything
    from lowvram_grpo.update import frozen_logprobs

    cpu = torch.device("cpu")
    seed_everything(0)
    policy, tokenizer = load_policy(config, cpu)
    with torch.no_grad():  # LoRA B starts at zero; make the policy differ from the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows = load_prompt_data(config, tokenizer).train[:num_prompts]
    rollout = generate_rollouts(policy, tokenizer, [r["prompt"] for r in rows], num_generations=num_generations,
                                chunk_size=16, max_prompt_length=config.max_prompt_length,
                                max_completion_length=config.max_completion_length)
    rewards = torch.randn(rollout.num_sequences, generator=torch.Generator().manual_seed(1))
    advantages, _ = grpo.group_advantages(rewards, num_generations, "group")
    with reference_model(policy):
        ref_logps = frozen_logprobs(policy, rollout, resolve_chunking(config, cpu), config.temperature, cpu)
    return policy, rollout, rewards, advantages, ref_logps


def sgd_learner(config, policy, start: dict, tokenizer=None, reward_functions=()):
    """A trainer Learner whose LoRA weights are reset to `start` (name -> tensor), with plain SGD
    (lr 1, constant) so that one update's weight change is the gradient itself."""
    from lowvram_grpo.planning.planner import resolve_chunking
    from lowvram_grpo.trainer import Learner

    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(start[name])
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    cpu = torch.device("cpu")
    return Learner(config, resolve_chunking(config, cpu), policy, tokenizer, optimizer, scheduler, None, cpu,
                   list(reward_functions))


def apply_curve_delta(store: dict, delta_text: str) -> dict:
    """What ui_curves.js does with the app's curve update: rows per run, appended at `start`
    (0 when the run is sent again from its first step). Returns the update."""
    delta = json.loads(delta_text)
    for name, part in delta["runs"].items():
        rows = store.setdefault(name, [])
        assert part["start"] in (0, len(rows))
        del rows[part["start"]:]
        rows.extend(dict(zip(part["keys"], row)) for row in part["rows"])
    return delta


def assert_step_two_resumes_exactly(config, run, records: list[dict], final: dict) -> None:
    """A 2-step run (`records`, its `final` adapter tensors) resumed from its step-1 checkpoint
    redoes step 2 exactly: the same loss and the same adapter."""
    import dataclasses
    import shutil

    from safetensors.torch import load_file

    from lowvram_grpo.trainer import train

    shutil.rmtree(run / "checkpoint-000002")
    shutil.rmtree(run / "final")
    resumed = []
    train(dataclasses.replace(config), resume=True, progress=False, on_step=resumed.append)
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["loss"] == pytest.approx(records[1]["loss"], abs=1e-6)
    again = load_file(str(run / "final" / "adapter_model.safetensors"))
    for key in final:
        torch.testing.assert_close(again[key], final[key], atol=1e-6, rtol=0)
