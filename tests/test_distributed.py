"""Data-parallel training: N processes with B/N sequences each act as one process with B.

Real process groups on the CPU (gloo), two processes:
- the update, on fixed rollouts, equals the single-process update for every loss_type (TRL's
  eight; beta > 0, off-policy ratios so clipping and the KL both matter), with adaptive entropy
  control, and with zero_std_groups=skip (beta = 0; also when one process skips all its groups);
  evaluation shared out over the processes gives the single-process metrics, and the helpers
  gather what they should;
- a 2-process tiny-cpu run through the CLI (with zero_std_groups=resample) writes the usual run
  directory; another one stopped by SIGTERM stops both processes after the same step, refuses a
  resume with another number of processes, and resumed with 2 ends bit-identical to the
  uninterrupted run.
"""

import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import fixed_step, sgd_learner
from safetensors.torch import load_file

from lowvram_grpo import distributed, grpo, rundir
from lowvram_grpo.config import ConfigError, load_config

WORLD_SIZE = 2
NUM_PROMPTS, G = 4, 4  # 16 sequences: 8 per process, 2 micro-batches of 4 each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- single process: every helper is a no-op ------------------------------------------------


def test_one_process_needs_no_process_group():
    w = distributed.world()
    assert (w.rank, w.world_size, w.is_main, w.distributed) == (0, 1, True, False)
    t = torch.arange(6.0).view(3, 2)
    assert distributed.all_gather_tensor(t) is t
    assert distributed.all_reduce_sum({"a": 1, "b": 2.5}) == {"a": 1, "b": 2.5}
    assert distributed.local_share([1, 2, 3]) == [1, 2, 3]
    assert distributed.gather_objects("x") == ["x"]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert not torch.distributed.is_initialized()


def test_prompts_must_divide_evenly_over_processes():
    config = load_config(preset="tiny-cpu", overrides={"prompts_per_step": 6})
    distributed.check_world_size(config, 3)
    with pytest.raises(ConfigError, match="prompts_per_step: 6 prompts cannot be shared evenly by 4 processes.*"
                                          "prompts_per_step=8"):
        distributed.check_world_size(config, 4)


def test_clip_extremes_are_per_micro_batch_over_every_process_then_averaged():
    """TRL's clip_ratio/low_min: per micro-batch, the min over every process's sequences in its
    micro-batch of that index; then the mean over micro-batches, NaN (no tokens) left out."""
    from lowvram_grpo.update import _mean_of_micro_batch_extremes

    nan = float("nan")
    per_process = [{"clip_low_min": [0.1, nan]}, {"clip_low_min": [0.3, 0.2, 0.4]}, {}]
    assert _mean_of_micro_batch_extremes(per_process, "clip_low_min", min) == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert _mean_of_micro_batch_extremes(per_process, "clip_low_min", max) == pytest.approx((0.3 + 0.2 + 0.4) / 3)
    assert math.isnan(_mean_of_micro_batch_extremes([{"clip_low_min": [nan]}, {}], "clip_low_min", min))


# --- the update on fixed rollouts: 2 processes == 1 process --------------------------------


def _config(tmp_path):
    return load_config(preset="tiny-cpu", overrides={
        "output_dir": str(tmp_path / "unused"), "micro_batch_size": 4, "beta": 0.04,
        "max_grad_norm": 1e6})  # no clipping: it would hide a gradient off by a constant factor


def _fixed_step(config, path):
    """One step's rollouts, advantages and log-probs, made once and saved: every process loads
    the same, so sampling randomness plays no part in the comparison."""
    from lowvram_grpo.planning.planner import resolve_chunking
    from lowvram_grpo.update import frozen_logprobs

    cpu = torch.device("cpu")
    policy, rollout, rewards, advantages, ref_logps = fixed_step(config, NUM_PROMPTS, G)
    # Old log-probs a little off: ratios != 1, so some tokens clip (a later iteration's case).
    noise = 0.3 * torch.randn(ref_logps.shape, generator=torch.Generator().manual_seed(2))
    old_logps = frozen_logprobs(policy, rollout, resolve_chunking(config, cpu), config.temperature, cpu) + noise
    lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    torch.save({"config": config, "rollout": rollout, "advantages": advantages, "ref_logps": ref_logps,
                "old_logps": old_logps, "lora": lora, "rewards": rewards}, path)


def _rows(rollout, rows: slice):
    return dataclasses.replace(
        rollout, prompt_ids=rollout.prompt_ids[rows], prompt_mask=rollout.prompt_mask[rows],
        completion_ids=rollout.completion_ids[rows], completion_mask=rollout.completion_mask[rows],
        completions=rollout.completions[rows], is_clipped=rollout.is_clipped[rows])


# Each loss type as it is meant to be used: cispo's epsilon_high caps the ratio itself (some
# tokens of these off-policy ratios exceed 1.2), luspo is sequence-level.
LOSS_TYPE_SETTINGS = {"cispo": {"epsilon_high": 1.2}, "luspo": {"importance_sampling_level": "sequence"}}
CASES = {loss_type: {"loss_type": loss_type, **LOSS_TYPE_SETTINGS.get(loss_type, {})} for loss_type in grpo.LOSS_TYPES}
# Adaptive entropy control: the first update measures the entropy of every process's tokens (below
# this target), the second applies the coefficient it raised; two updates where the others have one.
CASES["adaptive_entropy"] = {"loss_type": "dapo", "use_adaptive_entropy": True, "entropy_coef": 0.05,
                             "entropy_coef_delta": 0.01, "entropy_target": 100.0}
UPDATES = {"adaptive_entropy": 2}
# The statistic that shows each loss type's ratio handling was exercised.
RATIO_STATISTIC = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean", "sapo": None}


def _updates(data_path):
    """For each case (loss_type and settings), from the same LoRA weights: one `update._update`
    (UPDATES: more) on this process's share of the fixed step, with plain SGD so the weight
    change is the gradient itself."""
    from lowvram_grpo import update
    from lowvram_grpo.model import load_policy

    data = torch.load(data_path, weights_only=False)
    w = distributed.world()
    n = data["rollout"].num_sequences // w.world_size
    rows = slice(w.rank * n, (w.rank + 1) * n)
    rollout = _rows(data["rollout"], rows)
    policy, _ = load_policy(data["config"], torch.device("cpu"))
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    out = {}
    for case, settings in CASES.items():
        config = dataclasses.replace(data["config"], **settings)
        learner = sgd_learner(config, policy, data["lora"])
        for _ in range(UPDATES.get(case, 1)):
            stats = update._update(learner, rollout, data["advantages"][rows], data["ref_logps"][rows],
                                   data["old_logps"][rows])
        out[case] = {"weights": {k: p.detach().clone() for k, p in params.items()}, "stats": stats,
                     "entropy_control": learner.entropy_control.state_dict()}
    return out


# zero_std_groups=skip: which of the fixed step's 4 groups get equal rewards. Process 0 holds
# groups 0-1, process 1 groups 2-3: so one process skips some of its groups, or all of them.
SKIP_CASES = {"uneven": [1], "all_of_one_process": [0, 1]}
SKIP_LOSS_TYPES = ("dapo", "grpo")


def _skip_steps(data_path):
    """For each SKIP_CASES x SKIP_LOSS_TYPES, from the same LoRA weights: one `trainer.grpo_step`
    with zero_std_groups=skip and beta=0, the rollouts and rewards of the fixed step (this
    process's share) standing in for generation and scoring, with plain SGD."""
    from lowvram_grpo import trainer
    from lowvram_grpo.model import load_policy
    from lowvram_grpo.rewards.scoring import RewardScores
    from lowvram_grpo.sampling import PromptSampler

    data = torch.load(data_path, weights_only=False)
    w = distributed.world()
    n = data["rollout"].num_sequences // w.world_size
    rows = slice(w.rank * n, (w.rank + 1) * n)
    prompts = distributed.local_share([{"prompt": f"prompt {i}"} for i in range(NUM_PROMPTS)])
    policy, _ = load_policy(data["config"], torch.device("cpu"))
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    real_sample_groups, out = trainer._sample_groups, {}
    try:
        for case, equal_groups in SKIP_CASES.items():
            rewards = data["rewards"].clone()
            for group in equal_groups:
                rewards[group * G:(group + 1) * G] = 0.5
            share = rewards[rows]
            scores = RewardScores(names=["r"], per_function=share.unsqueeze(1), total=share)
            trainer._sample_groups = lambda *args, scores=scores: (prompts, _rows(data["rollout"], rows), scores, 0.0)
            for loss_type in SKIP_LOSS_TYPES:
                config = dataclasses.replace(data["config"], loss_type=loss_type, beta=0.0, zero_std_groups="skip",
                                             num_generations=G, prompts_per_step=NUM_PROMPTS)
                learner = sgd_learner(config, policy, data["lora"])
                record, _ = trainer.grpo_step(learner, [], PromptSampler(NUM_PROMPTS, 0), step=1)
                out[case, loss_type] = {"weights": {k: p.detach().clone() for k, p in params.items()},
                                        "record": record}
    finally:
        trainer._sample_groups = real_sample_groups
    return out


EVAL_PROMPTS = 5  # odd: the processes get 3 and 2


def _evaluation(data_path):
    """eval/* metrics of the fixed step's policy on EVAL_PROMPTS prompts, each process
    decoding its share (as the trainer's eval_every does)."""
    from lowvram_grpo.data import load_prompt_data
    from lowvram_grpo.evaluate import evaluate
    from lowvram_grpo.model import load_policy

    data = torch.load(data_path, weights_only=False)
    policy, tokenizer = load_policy(data["config"], torch.device("cpu"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(data["lora"][name])
    rows = load_prompt_data(data["config"], tokenizer).train[:EVAL_PROMPTS]
    return evaluate(policy, tokenizer, rows, None, data["config"])


def _helper_checks(data_path):
    """The collectives the trainer relies on, with results only right if they really gathered."""
    from lowvram_grpo.rewards.scoring import RewardScores
    from lowvram_grpo.sampling import _gather_scores

    w = distributed.world()
    r = w.rank
    uneven = torch.full((r + 1, r + 2), float(r + 1))  # rank 0: 1x2 of 1s, rank 1: 2x3 of 2s
    gathered = distributed.all_gather_tensor(uneven, pad_value=-1)
    assert gathered.tolist() == [[1, 1, -1], [2, 2, 2], [2, 2, 2]]
    flags = distributed.all_gather_tensor(torch.tensor([r == 1]))
    assert flags.tolist() == [False, True]
    assert distributed.gather_objects({"rank": r}) == [{"rank": 0}, {"rank": 1}]
    summed = distributed.all_reduce_sum({"count": r + 1, "x": 0.5})
    assert summed == {"count": 3, "x": 1.0} and isinstance(summed["count"], int)
    assert distributed.all_reduce_max({"t": float(r)}) == {"t": 1.0}
    assert distributed.any_rank(r == 1) and not distributed.any_rank(False)
    assert distributed.local_share(list(range(8))) == list(range(4 * r, 4 * r + 4))
    assert distributed.strided_share(list(range(5))) == [[0, 2, 4], [1, 3]][r]

    # Gradients: SUM over processes, a missing gradient counting as zeros.
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = None if r == 0 else torch.ones(3)
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.full((2,), float(r + 1))
    distributed.all_reduce_gradients([p, q])
    assert p.grad.tolist() == [1, 1, 1] and q.grad.tolist() == [3, 3]

    # scale_rewards="batch": gathered rewards give exactly the single-process advantages.
    data = torch.load(data_path, weights_only=False)
    rewards = data["rewards"]
    local = distributed.local_share(rewards)
    scores = RewardScores(names=["r"], per_function=local.unsqueeze(1), total=local)
    everything = _gather_scores(scores)
    torch.testing.assert_close(everything.total, rewards, rtol=0, atol=0)
    mine = distributed.local_share(grpo.group_advantages(everything.total, G, "batch")[0])
    torch.testing.assert_close(mine, distributed.local_share(grpo.group_advantages(rewards, G, "batch")[0]),
                               rtol=0, atol=0)


def _worker(rank, world_size, port, data_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    w = distributed.world()
    assert (w.rank, w.world_size) == (rank, world_size) and torch.distributed.get_backend() == "gloo"
    _helper_checks(data_path)
    torch.save({**_updates(data_path), "eval": _evaluation(data_path), "skip": _skip_steps(data_path)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.finish()


def test_two_processes_make_the_single_process_update(tiny_cache, tmp_path):
    data_path = tmp_path / "step.pt"
    _fixed_step(_config(tmp_path), data_path)
    single = _updates(data_path)  # this process: world size 1

    torch.multiprocessing.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(data_path), str(tmp_path)),
                                nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]

    start = torch.load(data_path, weights_only=False)["lora"]
    for case, expected in single.items():
        for name, weight in expected["weights"].items():
            assert not torch.equal(weight, start[name]), f"{case}: {name} did not move"
            # Every process applied the same update...
            torch.testing.assert_close(ranks[1][case]["weights"][name], ranks[0][case]["weights"][name],
                                       rtol=0, atol=0, msg=f"{case}: {name} differs between processes")
            # ...and it is the one a single process makes with the whole batch.
            torch.testing.assert_close(ranks[0][case]["weights"][name], weight, rtol=1e-5, atol=1e-6,
                                       msg=f"{case}: {name}")
        stats = ranks[0][case]["stats"]
        ratio_statistic = RATIO_STATISTIC.get(CASES[case]["loss_type"], "clip_ratio/region_mean")
        for key in ("loss", "grad_norm", "kl", "entropy", ratio_statistic):
            if key is not None:
                assert stats[key] == pytest.approx(expected["stats"][key], rel=1e-5, abs=1e-7), (case, key)
        # TRL's per-micro-batch extremes are over every process's sequences: the same on each.
        for key in ("clip_ratio/low_min", "clip_ratio/high_max"):
            assert (key in stats) == (CASES[case]["loss_type"] in grpo.CLIPPED_LOSS_TYPES), (case, key)
            if key in stats:
                assert ranks[1][case]["stats"][key] == stats[key], (case, key)
    assert single["cispo"]["stats"]["cispo_clip_ratio"] > 0
    assert single["grpo"]["stats"]["kl"] > 0 and single["grpo"]["stats"]["clip_ratio/region_mean"] > 0
    # The adaptive coefficient moved on the entropy of both processes' tokens, as one process's did.
    control = single["adaptive_entropy"]["entropy_control"]
    assert control["entropy_coef"] == pytest.approx(0.07) and control["last_world_entropy"] < 100.0
    for rank in ranks:
        assert rank["adaptive_entropy"]["entropy_control"]["entropy_coef"] == pytest.approx(0.07)
        assert rank["adaptive_entropy"]["entropy_control"]["last_world_entropy"] == pytest.approx(
            control["last_world_entropy"], rel=1e-6)
        assert rank["adaptive_entropy"]["stats"]["entropy_coef"] == pytest.approx(0.07)

    # zero_std_groups=skip: whichever groups each process leaves out, the update is one process's.
    for (case, loss_type), expected in _skip_steps(data_path).items():
        for rank in ranks:
            got = rank["skip"][case, loss_type]
            for name, weight in expected["weights"].items():
                assert not torch.equal(weight, start[name]), f"{case}/{loss_type}: {name} did not move"
                torch.testing.assert_close(got["weights"][name], weight, rtol=1e-5, atol=1e-6,
                                           msg=f"{case}/{loss_type}: {name}")
            for key in ("loss", "grad_norm", "entropy", "clip_ratio/region_mean", "reward",
                        "dynamic_sampling/skipped_token_fraction"):
                assert got["record"][key] == pytest.approx(expected["record"][key], rel=1e-5, abs=1e-7), key
            assert got["record"]["dynamic_sampling/skipped_groups"] == len(SKIP_CASES[case])
            assert got["record"]["frac_reward_zero_std"] == len(SKIP_CASES[case]) / NUM_PROMPTS

    # Evaluation shared out (3 + 2 prompts) gives one process's metrics over all 5, on every process.
    alone = _evaluation(data_path)
    assert alone["eval/num_prompts"] == EVAL_PROMPTS and alone["eval/completions/mean_length"] > 0
    for rank in ranks:
        assert rank["eval"].keys() == alone.keys()
        for key, value in alone.items():
            assert rank["eval"][key] == pytest.approx(value, rel=1e-6), key


# --- the CLI: a 2-process run, SIGTERM, resume ------------------------------------------------


def _cli(*args):
    return [sys.executable, "-m", "lowvram_grpo", "train", "--no-progress", *args]


# With dynamic sampling's resample: both processes must agree on the rounds and on which groups
# fill the step, whose shares then differ in size; a resumed run must redraw exactly the same.
RUN_ARGS = ["--preset", "tiny-cpu", "--num-processes", "2", "max_steps=4", "prompts_per_step=8", "save_every=2",
            "keep_checkpoints=0", "zero_std_groups=resample"]


@pytest.fixture(scope="module")
def two_process_run(tiny_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("dp") / "run"
    done = subprocess.run(_cli(*RUN_ARGS, f"output_dir={run}"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run, done.stdout


def test_two_process_run_writes_one_run_directory(two_process_run):
    run, stdout = two_process_run
    assert stdout.count("adapter saved to") == 1, "only rank 0 reports"
    names = {p.name for p in run.iterdir()}
    assert names == {"config.yaml", "status.json", "metrics.jsonl", "completions.jsonl", "final",
                     "checkpoint-000002", "checkpoint-000004"}
    status = rundir.read_status(run)
    assert status["state"] == "finished" and status["step"] == 4
    records = rundir.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/arith_answer/mean", "rewards/arith_answer/std", "kl", "loss",
                "grad_norm", "learning_rate", "completions/mean_length", "completions/clipped_ratio",
                "frac_reward_zero_std", "clip_ratio/region_mean", "entropy", "step_time", "tokens_per_second",
                "peak_memory_gb", "generation_chunk_size"):
        assert all(key in r for r in records), key
    assert any(r["dynamic_sampling/resample_rounds"] > 0 for r in records), "resampling was exercised"
    assert all(r["frac_reward_zero_std"] == 0 for r in records if r["dynamic_sampling/informative_groups"] == 8)
    # Step 1's first num_completions_to_log completions, once (not once per process).
    samples = rundir.read_jsonl(run / "completions.jsonl")
    assert [s["step"] for s in samples] == [1] * min(load_config(preset="tiny-cpu").num_completions_to_log, 64)
    state = torch.load(run / "checkpoint-000004" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowvram_grpo.builtin.tiny_model import tiny_model_path

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path()), run / "final")
    final = load_file(run / "final" / "adapter_model.safetensors")
    assert any(w.abs().max() > 0 for name, w in final.items() if "lora_B" in name)


def test_sigterm_stops_both_processes_and_resume_matches_the_straight_run(two_process_run, tmp_path):
    straight, _ = two_process_run
    run = tmp_path / "run"
    process = subprocess.Popen(_cli(*RUN_ARGS, f"output_dir={run}"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while (rundir.read_status(run) or {}).get("step", 0) < 1 and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # to the `lowvram-grpo` process, as the app does
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    status = rundir.read_status(run)
    assert status["state"] == "stopped" and status["step"] < 4, status
    assert (run / f"checkpoint-{status['step']:06d}" / "trainer_state.pt").is_file()
    assert output.count("--resume") == 1, "only rank 0 reports"

    wrong = subprocess.run(_cli("--resume", str(run)), capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2
    assert "saved by a run of 2 process(es), this one has 1; resume it with --num-processes 2" in wrong.stderr

    resumed = subprocess.run(_cli("--resume", str(run), "--num-processes", "2"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(run / "final" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    assert [r["step"] for r in rundir.read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_num_processes_checks_before_starting_anything(tmp_path, capsys, monkeypatch):
    from lowvram_grpo.cli import main

    assert main(["train", "--preset", "tiny-cpu", "--num-processes", "3", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "prompts_per_step: 8 prompts cannot be shared evenly by 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as inside `accelerate launch`
    assert main(["train", "--preset", "tiny-cpu", "--num-processes", "2"]) == 2
    assert "started by a launcher" in capsys.readouterr().err
