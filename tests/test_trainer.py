"""The training loop end to end on the built-in tiny model: it learns, it writes the run
directory the front ends rely on, it resumes exactly, and it refuses to apply a broken step."""

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import fixed_step
from safetensors.torch import load_file

from lowvram_grpo import grpo, rundir
from lowvram_grpo.builtin import arith
from lowvram_grpo.config import load_config
from lowvram_grpo.rewards.base import RewardFunctionError
from lowvram_grpo.sampling import PromptSampler
from lowvram_grpo.trainer import train


def _config(tmp_path, name="run", **overrides):
    return load_config(preset="tiny-cpu", overrides={"output_dir": str(tmp_path / name), **overrides})


def test_demo_reward_climbs(demo_run):
    config, _ = demo_run
    rewards = [r["reward"] for r in rundir.read_jsonl(f"{config.output_dir}/metrics.jsonl")]
    tenth = len(rewards) // 10
    first, last = sum(rewards[:tenth]) / tenth, sum(rewards[-tenth:]) / tenth
    assert last >= first + 0.3, f"reward went from {first:.2f} to {last:.2f}: {rewards}"


def test_run_directory_contract(demo_run):
    config, final = demo_run
    run = final.parent
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "status.json", "metrics.jsonl", "completions.jsonl", "final"} <= names
    # save_every=20 over 60 steps, keep_checkpoints=2: the two newest survive.
    assert sorted(n for n in names if n.startswith("checkpoint-")) == ["checkpoint-000040", "checkpoint-000060"]
    assert not [n for n in names if n.endswith(".tmp")]

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == 60

    records = rundir.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 61))
    for key in ("reward", "reward_std", "rewards/arith_answer/mean", "rewards/arith_answer/std", "kl",
                "loss", "grad_norm", "learning_rate", "completions/mean_length", "completions/clipped_ratio",
                "frac_reward_zero_std", "clip_ratio/region_mean", "entropy", "step_time",
                "tokens_per_second", "peak_memory_gb", "generation_chunk_size"):
        assert all(key in r for r in records), key
    samples = rundir.read_jsonl(run / "completions.jsonl")
    assert {s["step"] for s in samples} == {1, 10, 20, 30, 40, 50, 60}
    assert {"prompt", "completion", "reward", "advantage", "rewards"} <= set(samples[0])
    assert load_config(config_path=run / "config.yaml") == config


def test_final_adapter_loads_with_plain_peft_and_lora_changed(demo_run, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, final = demo_run
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in final.iterdir()}
    weights = load_file(final / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    # LoRA's B starts at exactly zero, so any non-zero entry is learned.
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = PeftModel.from_pretrained(base, final)
    ids = torch.tensor([[5 + 3, 13, 5 + 5, 14]])  # any tokens will do
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (tuned - plain).abs().max() > 1e-3


def test_nonfinite_step_is_skipped_not_applied(tiny_cache, tmp_path, monkeypatch):
    real_loss = grpo.grpo_loss
    calls = {"n": 0}

    def poisoned_on_second_step(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] == 2 else (loss, stats)

    monkeypatch.setattr(grpo, "grpo_loss", poisoned_on_second_step)
    records = []
    # A checkpoint after every step shows the LoRA weights before and after the broken one.
    config = _config(tmp_path, max_steps=3, save_every=1, keep_checkpoints=0)
    train(config, progress=False, on_step=records.append)
    assert [r["step_skipped"] for r in records] == [0, 1, 0]
    w1 = load_file(tmp_path / "run" / "checkpoint-000001" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "run" / "checkpoint-000002" / "adapter_model.safetensors")
    w3 = load_file(tmp_path / "run" / "checkpoint-000003" / "adapter_model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the NaN step must not change the weights"
    assert any(not torch.equal(w2[k], w3[k]) for k in w2), "training goes on after it"


def test_failing_reward_function_stops_the_run_naming_it(tiny_cache, tmp_path):
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text("def picky(completions, **kwargs):\n    raise ValueError('no digits allowed')\n")
    config = _config(tmp_path, rewards=[f"{reward_file}:picky"], max_steps=2)
    with pytest.raises(RewardFunctionError, match="picky.*no digits allowed"):
        train(config, progress=False)
    status = rundir.read_status(config.output_dir)
    assert status["state"] == "failed" and "picky" in status["error"]


def test_prompt_sampler_walks_epochs_deterministically():
    sampler = PromptSampler(5, seed=1)
    first = sampler.next_indices(3) + sampler.next_indices(3)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]  # one full epoch before any repeat
    resumed = PromptSampler(5, seed=1, **PromptSampler(5, seed=1).state_dict())
    assert resumed.next_indices(6) == first


# --- the CLI, interruption and resume (real processes) ----------------------------------------


def _cli(*args):
    return [sys.executable, "-m", "lowvram_grpo", "train", "--no-progress", *args]


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# With adaptive entropy control, whose state must survive the kill too: the entropy starts
# near 0.65 nats and falls below the 0.55 target within a few steps, so the coefficient first falls
# (no bonus), then rises and is applied.
RESUME_ARGS = ["--preset", "tiny-cpu", "max_steps=12", "save_every=4", "keep_checkpoints=0",
               "use_adaptive_entropy=true", "entropy_coef=0.05", "entropy_coef_delta=0.02", "entropy_target=0.55"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_cache, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(*RESUME_ARGS, f"output_dir={straight}"), check=True, capture_output=True)

    process = subprocess.Popen(_cli(*RESUME_ARGS, f"output_dir={killed}"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: (killed / "checkpoint-000004").is_dir())
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists(), "the kill came too late to test anything"

    subprocess.run(_cli("--resume", str(killed)), check=True, capture_output=True)
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    records = rundir.read_jsonl(killed / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13)), "redone steps must not be logged twice"

    # The entropy coefficient went down and up, and resumed from the checkpoint where it was.
    coefs = [r["entropy_coef"] for r in rundir.read_jsonl(straight / "metrics.jsonl")]
    assert any(b < a for a, b in zip(coefs, coefs[1:])) and any(b > a for a, b in zip(coefs, coefs[1:])), coefs
    assert [r["entropy_coef"] for r in records] == coefs
    state = torch.load(killed / "checkpoint-000004" / "trainer_state.pt", weights_only=False)
    assert state["entropy_control"] == {"entropy_coef": coefs[3], "last_world_entropy": records[3]["entropy"]}


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_cache, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(_cli("--preset", "tiny-cpu", "max_steps=1000", f"output_dir={run}"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: (rundir.read_status(run) or {}).get("step", 0) >= 2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    status = rundir.read_status(run)
    assert status["state"] == "stopped"
    assert (run / f"checkpoint-{status['step']:06d}" / "adapter_model.safetensors").is_file()
    assert "--resume" in output


def test_cli_dry_run_and_errors(tiny_cache, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    dry = subprocess.run(_cli("--preset", "tiny-cpu", "--dry-run", "lr=3e-4", "--dataset", str(data)),
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "learning_rate: 0.0003" in dry.stdout and f"dataset: {data}" in dry.stdout

    bad = subprocess.run(_cli("--preset", "tiny-cpu", "num_generationz=4"), capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: num_generationz: unknown config key. Did you mean 'num_generations'?"

    missing = subprocess.run(_cli("--resume", str(tmp_path / "nowhere")), capture_output=True, text=True)
    assert missing.returncode == 2 and "has no config.yaml" in missing.stderr


def test_training_continues_from_an_existing_adapter(demo_run):
    from lowvram_grpo.model import load_policy

    config, final = demo_run
    saved = load_file(final / "adapter_model.safetensors")
    policy, _ = load_policy(load_config(preset="tiny-cpu", overrides={"adapter_path": str(final)}),
                            torch.device("cpu"))
    loaded = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    assert len(loaded) == len(saved)
    for name, param in loaded.items():
        key = name.replace(".default", "")
        torch.testing.assert_close(param.detach(), saved[key], rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [
    {"loss_type": "grpo", "beta": 0.0},
    {"loss_type": "dr_grpo", "scale_rewards": "none", "micro_batch_size": 16},
    {"loss_type": "bnpo", "scale_rewards": "batch", "epsilon_high": 0.28},
    {"loss_type": "dapo", "quantization": "none", "gradient_checkpointing": False, "generation_chunk_size": 5},
])
def test_every_variant_trains(tiny_cache, tmp_path, overrides):
    records = []
    train(_config(tmp_path, max_steps=3, save_every=100, **overrides), progress=False, on_step=records.append)
    assert len(records) == 3
    assert all(r["step_skipped"] == 0 for r in records)
    assert records[-1]["grad_norm"] > 0 and torch.isfinite(torch.tensor(records[-1]["loss"]))


def test_num_iterations_reuses_rollouts_for_several_updates(tiny_cache, tmp_path, monkeypatch):
    from lowvram_grpo import sampling

    generations, updates = [], []
    real_generate, real_step = sampling.generate_rollouts, torch.optim.AdamW.step
    monkeypatch.setattr(sampling, "generate_rollouts", lambda *a, **k: generations.append(1) or real_generate(*a, **k))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: updates.append(1) or real_step(self, *a, **k))
    records = []
    train(_config(tmp_path, max_steps=2, num_iterations=3, epsilon=0.01, save_every=100),
          progress=False, on_step=records.append)
    assert (len(generations), len(updates)) == (2, 6)
    # Later updates on the same rollouts are off-policy, so with a tight clip some tokens clip.
    assert max(r["clip_ratio/region_mean"] for r in records) > 0


def test_eval_every_logs_eval_metrics(tiny_cache, tmp_path):
    records = []
    train(_config(tmp_path, max_steps=4, eval_every=2, eval_fraction=0.05, save_every=100),
          progress=False, on_step=records.append)
    evaluated = [r["step"] for r in records if "eval/reward" in r]
    assert evaluated == [2, 4]
    assert 0.0 <= records[-1]["eval/accuracy"] <= 1.0
    from lowvram_grpo.config import ConfigError

    data = tmp_path / "sums.jsonl"  # a user's dataset: no split of its own, unlike builtin:arith
    data.write_text("".join(json.dumps(row) + "\n" for row in arith.arith_rows(20, seed=3)))
    with pytest.raises(ConfigError, match="eval_every: there is no eval split"):
        train(_config(tmp_path, name="no-eval", max_steps=2, eval_every=1, dataset=str(data)), progress=False)


def test_user_dataset_and_dropped_prompts_are_reported(tiny_cache, tmp_path, capsys):
    data = tmp_path / "sums.jsonl"
    rows = [{"question": f"{a}+{b}=", "solution": str(a + b)} for a in range(5) for b in range(5)]
    rows.append({"question": "1+1+1+1+1+1+1+1+1=", "solution": "9"})  # longer than max_prompt_length
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = []
    train(_config(tmp_path, dataset=str(data), prompt_column="question", answer_column="solution",
                  max_prompt_length=8, max_steps=2, save_every=100), progress=False, on_step=records.append)
    out = capsys.readouterr().out
    assert "sums.jsonl (26 rows)" in out and "dropped 1 prompts longer than max_prompt_length" in out
    assert len(records) == 2


def test_a_new_run_never_overwrites_an_existing_one(demo_run):
    config, final = demo_run
    before = (final.parent / "metrics.jsonl").read_text()
    from lowvram_grpo.config import ConfigError

    with pytest.raises(ConfigError, match="already holds a training run; continue it with .*--resume"):
        train(config, progress=False)
    assert (final.parent / "metrics.jsonl").read_text() == before
    assert rundir.read_status(final.parent)["state"] == "finished"


def test_conversational_prompts_go_through_the_chat_template(tiny_cache, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{a}="}], "answer": str(2 * a)})
                            + "\n" for a in range(10)))
    config = _config(tmp_path, dataset=str(data), prompt_column="messages", system_prompt="+",
                     max_steps=2, save_every=100)
    records = []
    train(config, progress=False, on_step=records.append)
    samples = rundir.read_jsonl(tmp_path / "run" / "completions.jsonl")
    # The system prompt was prepended, and rewards saw TRL's conversational completion form.
    assert samples[0]["prompt"][0] == {"role": "system", "content": "+"}
    assert samples[0]["prompt"][1]["role"] == "user"
    assert len(records) == 2 and all(0.0 <= r["reward"] <= 1.0 for r in records)


# --- fp16 (GPUs without bf16, such as the T4): loss scaling -------------------------------------


def _fp16_step(tmp_path):
    """A tiny fp16 policy whose LoRA differs from the reference, and one step's rollouts,
    advantages and reference log-probs (see conftest.fixed_step)."""
    config = _config(tmp_path, dtype="float16", micro_batch_size=8)
    policy, rollout, _, advantages, ref_logps = fixed_step(config, num_prompts=4, num_generations=4)
    return config, policy, rollout, advantages, ref_logps


def _learner(config, policy, optimizer, scheduler=None, scaler=None):
    from lowvram_grpo.planning.planner import resolve_chunking
    from lowvram_grpo.trainer import Learner

    cpu = torch.device("cpu")
    return Learner(config, resolve_chunking(config, cpu), policy, None, optimizer, scheduler, scaler, cpu, [])


def test_fp16_loss_scaling_keeps_gradients_that_underflow_without_it(tiny_cache, tmp_path):
    """A loss a million times smaller (as when it is averaged over a million tokens) has
    gradients a million times smaller: fp16 activations flush most of them to zero unless the
    loss is scaled up for backward and the gradients scaled back down."""
    from lowvram_grpo.trainer import build_loss_scaler
    from lowvram_grpo.update import _accumulate_gradients

    config, policy, rollout, advantages, ref_logps = _fp16_step(tmp_path)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.0)
    cpu = torch.device("cpu")

    def gradients(advantage_factor, scaler):
        learner = _learner(config, policy, optimizer, scaler=scaler)
        _accumulate_gradients(learner, rollout, advantages * advantage_factor, None, None, rollout.num_sequences,
                              float(rollout.completion_mask.sum()), learner.chunking)
        if scaler is not None:
            scaler.unscale_(optimizer)
            scaler.update()
        return torch.cat([p.grad.flatten() for p in params.values()]).double()

    config.beta = 0.0  # the policy-gradient term alone, which scales with the advantages
    expected = gradients(1.0, None) * 1e-6
    unscaled = gradients(1e-6, None)
    scaler = build_loss_scaler(config, cpu)
    assert scaler is not None and scaler.get_scale() == 65536.0
    scaled = gradients(1e-6, scaler)
    relative = lambda g: float((g - expected).norm() / expected.norm())  # noqa: E731
    assert relative(scaled) < 0.05, "with loss scaling the small gradients survive"
    assert relative(unscaled) > 0.3, "without it fp16 loses them (else this test shows nothing)"
    assert build_loss_scaler(dataclasses.replace(config, dtype="bfloat16"), cpu) is None


def test_fp16_overflow_skips_the_update_and_lowers_the_scale(tiny_cache, tmp_path):
    from lowvram_grpo.update import _update

    config, policy, rollout, advantages, ref_logps = _fp16_step(tmp_path)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 holds at most 65504
    learner = _learner(config, policy, optimizer, scheduler, scaler)
    result = _update(learner, rollout, advantages, ref_logps, None)
    assert result["step_skipped"] == 1 and result["loss_scale"] == 2.0**39
    assert all(torch.equal(p, before[n]) for n, p in params.items()), "an overflowed step changes nothing"
    for _ in range(40):  # the next steps halve the scale until the scaled gradients fit in fp16
        result = _update(learner, rollout, advantages, ref_logps, None)
        if not result["step_skipped"]:
            break
    assert result["step_skipped"] == 0 and math.isfinite(result["grad_norm"]) and result["loss_scale"] < 2.0**39
    assert any(not torch.equal(p, before[n]) for n, p in params.items())


def test_fp16_run_saves_and_resumes_its_loss_scale(tiny_cache, tmp_path):
    records = []
    config = _config(tmp_path, dtype="float16", max_steps=2, save_every=2, lr_scheduler="constant")
    train(config, progress=False, on_step=records.append)
    assert [r["step_skipped"] for r in records] == [0, 0] and records[-1]["loss_scale"] == 65536.0
    state_path = tmp_path / "run" / "checkpoint-000002" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=False)
    assert state["loss_scaler"]["scale"] == 65536.0
    state["loss_scaler"]["scale"] = 1024.0  # as if overflows had lowered it
    torch.save(state, state_path)
    resumed = []
    train(dataclasses.replace(config, max_steps=3), resume=True, progress=False, on_step=resumed.append)
    assert [r["step"] for r in resumed] == [3] and resumed[0]["loss_scale"] == 1024.0


def test_fp16_refuses_whole_modules_to_save_before_loading(tiny_cache, tmp_path, monkeypatch):
    from lowvram_grpo import trainer
    from lowvram_grpo.config import ConfigError

    monkeypatch.setattr(trainer, "load_policy", lambda *a, **k: pytest.fail("the model should not load"))
    with pytest.raises(ConfigError, match="lora_modules_to_save: whole modules cannot be trained in fp16"):
        train(_config(tmp_path, dtype="float16", lora_modules_to_save=["lm_head"]), progress=False)
