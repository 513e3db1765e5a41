"""Nothing lost, nothing hangs, every user error is one line.

Each test here stands for a way a run lost data, could not be stopped, or answered bad input
with a traceback or too late: the run directory's files round-trip any text, a reward function
that never returns is bounded and interruptible, and inputs are checked before the model loads.
"""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowvram_grpo import cli, rundir
from lowvram_grpo.builtin import arith
from lowvram_grpo.config import ConfigError, load_config
from lowvram_grpo.data import DatasetError, read_prompt_rows
from lowvram_grpo.metrics import mean_over_updates
from lowvram_grpo.planning.backoff import MemoryBudgetError
from lowvram_grpo.rewards.base import RewardFunction, RewardFunctionError
from lowvram_grpo.rewards.scoring import score_completions
from lowvram_grpo.stopping import StepInterrupted, call_with_deadline
from lowvram_grpo.trainer import train

LINE_SEPARATORS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c\r"


def _config(tmp_path, name="run", **overrides):
    return load_config(preset="tiny-cpu", overrides={"output_dir": str(tmp_path / name), **overrides})


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lowvram_grpo", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- the run directory's files keep every record ----------------------------------------------


def test_records_with_unicode_line_separators_survive_read_and_truncate(tmp_path):
    path = tmp_path / "completions.jsonl"
    records = [{"step": step, "prompt": f"{step}+1={sep}", "completion": f"x{sep}y"}
               for step, sep in enumerate(LINE_SEPARATORS, start=1)]
    for record in records:
        rundir.append_jsonl(path, record)
    assert rundir.read_jsonl(path) == records
    rundir.truncate_jsonl_after_step(path, 4)
    assert rundir.read_jsonl(path) == records[:4]


def test_a_torn_last_line_is_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rundir.append_jsonl(path, {"step": 1, "text": "é\u2028"})
    with path.open("ab") as f:
        f.write('{"step": 2, "text": "é'.encode()[:-1])  # killed in the middle of a character
    assert rundir.read_jsonl(path) == [{"step": 1, "text": "é\u2028"}]


def test_jsonl_follower_reads_each_appended_line_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = rundir.JsonlFollower(path)
    assert follower.update() == []  # no file yet: nothing, no error
    for step in (1, 2):
        rundir.append_jsonl(path, {"step": step, "text": f"{step}\u2028"})
    assert follower.update() == [{"step": 1, "text": "1\u2028"}, {"step": 2, "text": "2\u2028"}]
    assert follower.update() == []
    rundir.append_jsonl(path, {"step": 3})
    assert follower.update() == [{"step": 3}]
    assert [r["step"] for r in follower.records] == [1, 2, 3] and follower.generation == 0


def test_jsonl_follower_leaves_a_torn_line_for_the_next_read(tmp_path):
    path = tmp_path / "completions.jsonl"
    rundir.append_jsonl(path, {"step": 1})
    line = rundir.jsonl_line({"step": 2, "completion": "é"}).encode()
    with path.open("ab") as f:
        f.write(line[:-3])  # the writer is in the middle of "é"
    follower = rundir.JsonlFollower(path)
    assert follower.update() == [{"step": 1}]
    with path.open("ab") as f:
        f.write(line[-3:])
    assert follower.update() == [{"step": 2, "completion": "é"}]
    assert [r["step"] for r in follower.records] == [1, 2] and follower.generation == 0


def test_jsonl_follower_rereads_a_truncated_or_recreated_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in range(1, 6):
        rundir.append_jsonl(path, {"step": step, "loss": 0.5})
    follower = rundir.JsonlFollower(path)
    follower.update()

    # A resumed run drops steps after its checkpoint and redoes them, here past the old length
    # before the next read.
    rundir.truncate_jsonl_after_step(path, 3)
    for step in range(4, 8):
        rundir.append_jsonl(path, {"step": step, "loss": 0.25})
    assert [(r["step"], r["loss"]) for r in follower.update()] == [(1, 0.5), (2, 0.5), (3, 0.5)] + [
        (s, 0.25) for s in range(4, 8)]
    assert follower.generation == 1 and len(follower.records) == 7

    # Rewritten in place (same file), longer than before: the last line read is not there any more.
    with path.open("r+b") as f:
        f.write(b"".join(rundir.jsonl_line({"step": s, "loss": 0.125}).encode() for s in range(1, 9)))
    assert [r["loss"] for r in follower.update()] == [0.125] * 8 and follower.generation == 2

    # Deleted (the run was deleted), then made again under the same name.
    path.unlink()
    assert follower.update() == [] and follower.records == [] and follower.generation == 3
    rundir.append_jsonl(path, {"step": 1, "loss": 1.0})
    assert follower.update() == [{"step": 1, "loss": 1.0}] and follower.generation == 3


def test_nan_anywhere_in_a_record_is_written_as_null(tmp_path):
    path = tmp_path / "completions.jsonl"
    rundir.append_jsonl(path, {"step": 1, "reward": float("nan"),
                                "rewards": {"numeric_answer": float("nan"), "fmt": 1.0},
                                "history": [float("inf"), {"deep": float("-inf")}]})
    text = path.read_text(encoding="utf-8")

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    record = json.loads(text, parse_constant=refuse)  # what every non-Python JSON reader does
    assert record == {"step": 1, "reward": None, "rewards": {"numeric_answer": None, "fmt": 1.0},
                      "history": [None, {"deep": None}]}


def test_training_on_prompts_with_line_separators_keeps_completions_across_resume(tiny_cache, tmp_path):
    rows = [{**row, "prompt": row["prompt"] + "\u2028"} for row in arith.arith_rows(64, seed=0)]
    dataset = _write_jsonl(tmp_path / "data.jsonl", rows)
    config = _config(tmp_path, dataset=str(dataset), max_steps=3, log_completions_every=1,
                     num_completions_to_log=2)
    train(config, progress=False)
    completions = tmp_path / "run" / "completions.jsonl"
    assert [r["step"] for r in rundir.read_jsonl(completions)] == [1, 1, 2, 2, 3, 3]
    assert all(r["prompt"].endswith("\u2028") for r in rundir.read_jsonl(completions))

    train(dataclasses.replace(config, max_steps=4), resume=True, progress=False)
    assert [r["step"] for r in rundir.read_jsonl(completions)] == [1, 1, 2, 2, 3, 3, 4, 4]


# --- reward calls that never return -------------------------------------------------------------

HANGING_REWARDS = '''
import os
import time

from lowvram_grpo.rewards.builtins import arith_answer

calls = 0


def answer_then_hang(prompts, completions, **kwargs):
    """arith_answer for two steps; in the third, announce it and never return."""
    global calls
    calls += 1
    if calls == 3:
        open(os.environ["HANG_MARKER"], "w").close()
        while True:
            if os.environ.get("HANG_STYLE") == "sleep":
                time.sleep(1)
    return arith_answer(prompts, completions, **kwargs)
'''


def _start_hanging_run(tmp_path, style: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    reward_file = tmp_path / "hanging_rewards.py"
    reward_file.write_text(HANGING_REWARDS, encoding="utf-8")
    run, marker = tmp_path / "run", tmp_path / "hanging"
    process = subprocess.Popen(
        [sys.executable, "-m", "lowvram_grpo", "train", "--preset", "tiny-cpu", "--no-progress",
         f"output_dir={run}", "max_steps=10", "save_every=100", f"rewards=['{reward_file}:answer_then_hang']",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HANG_MARKER": str(marker), "HANG_STYLE": style})
    return process, run, marker


def test_a_reward_call_over_reward_timeout_fails_the_run_naming_it(tiny_cache, tmp_path):
    process, run, _ = _start_hanging_run(tmp_path, "busy", "reward_timeout=3")
    out, err = process.communicate(timeout=240)
    assert process.returncode == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "error: reward function 'answer_then_hang' did not return within reward_timeout=3 s")
    status = rundir.read_status(run)
    assert status["state"] == "failed" and "answer_then_hang" in status["error"]
    # The last finished step is saved, though save_every=100 never asked for it.
    assert (run / "checkpoint-000002" / "adapter_model.safetensors").is_file()


def test_one_sigterm_during_a_hanging_reward_stops_the_run_and_resume_is_exact(tiny_cache, tmp_path):
    process, run, marker = _start_hanging_run(tmp_path, "sleep", "reward_timeout=none", "max_steps=4")
    deadline = time.time() + 240
    while not marker.exists():
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert process.returncode == 0, err
    assert "Traceback" not in err and "stop requested" in err
    status = rundir.read_status(run)
    assert status["state"] == "stopped" and status["step"] == 2
    assert "--resume" in out

    # Resumed from the saved step, the run is the one that never stopped.
    resume = _cli("train", "--resume", str(run), "--no-progress", "rewards=[arith_answer]")
    assert resume.returncode == 0, resume.stderr
    straight = _cli("train", "--preset", "tiny-cpu", "--no-progress", f"output_dir={tmp_path / 'straight'}",
                    "max_steps=4", "save_every=100")
    assert straight.returncode == 0, straight.stderr
    resumed_weights = load_file(run / "final" / "adapter_model.safetensors")
    straight_weights = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    for name, weight in straight_weights.items():
        assert torch.equal(weight, resumed_weights[name]), name


def test_a_call_is_abandoned_at_its_deadline_or_at_a_stop_request():
    started = time.monotonic()
    with pytest.raises(RewardFunctionError, match="'forever' did not return within reward_timeout=0.3 s"):
        score_completions([RewardFunction("forever", lambda **kw: time.sleep(60), 1.0, timeout=0.3)],
                          ["p"], ["c"], None, {})
    assert time.monotonic() - started < 5

    asked = time.monotonic() + 0.3
    with pytest.raises(StepInterrupted):
        call_with_deadline(lambda: time.sleep(60), None, should_stop=lambda: time.monotonic() > asked)
    assert time.monotonic() - asked < 2
    assert call_with_deadline(lambda: 42, 5.0) == 42
    with pytest.raises(KeyError):  # the call's own error comes through unchanged
        call_with_deadline(lambda: {}["missing"], 5.0)


def test_a_stop_request_ends_generation_at_the_next_token(tiny_path):
    from lowvram_grpo.model import load_policy
    from lowvram_grpo.rollout import generate_rollouts

    config = load_config(preset="tiny-cpu")
    policy, tokenizer = load_policy(config, torch.device("cpu"))
    tokens_seen = []

    def stop_after_three_tokens() -> bool:
        tokens_seen.append(1)
        return len(tokens_seen) > 3

    with pytest.raises(StepInterrupted):
        generate_rollouts(policy, tokenizer, ["1+1="] * 2, num_generations=2, chunk_size=2,
                          max_prompt_length=16, max_completion_length=200, should_stop=stop_after_three_tokens)
    assert len(tokens_seen) < 10  # asked once per chunk and once per token: it did not run on for 200


# --- inputs checked before the model loads, in --dry-run too -------------------------------------


@pytest.fixture
def model_never_loads(monkeypatch):
    import lowvram_grpo.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(trainer, "load_policy", refuse)
    monkeypatch.setattr(trainer, "resolve_model_path", refuse)


@pytest.mark.parametrize("rewards, message", [
    ([{"name": "numeric_answr"}], "unknown reward 'numeric_answr': did you mean 'numeric_answer'?"),
    (["missing_file.py:fn"], "file not found"),
    (["{syntax}:fn"], "importing"),
    (["{good}:nope"], "has no function 'nope'"),
])
def test_bad_rewards_fail_before_the_model_loads_and_leave_no_run_dir(tmp_path, model_never_loads, rewards,
                                                                      message):
    (tmp_path / "syntax.py").write_text("def fn(:\n")
    (tmp_path / "good.py").write_text("def fn(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    rewards = [r.format(syntax=tmp_path / "syntax.py", good=tmp_path / "good.py") if isinstance(r, str) else r
               for r in rewards]
    config = _config(tmp_path, rewards=rewards)
    with pytest.raises(RewardFunctionError, match=message):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_missing_dataset_fails_first_and_suggests_no_run_dir(tmp_path, model_never_loads):
    config = _config(tmp_path, "my_run", dataset=str(tmp_path / "my_dat.jsonl"))
    with pytest.raises(DatasetError) as err:
        train(config, progress=False)
    assert "my_run" not in str(err.value)
    assert not (tmp_path / "my_run").exists()


def test_dry_run_checks_rewards_and_the_local_dataset(tiny_cache, tmp_path):
    bad_reward = _cli("train", "--preset", "tiny-cpu", "--dry-run", "rewards=[{name: numeric_answr}]")
    assert bad_reward.returncode == 2
    assert bad_reward.stderr.strip().splitlines() == [
        "error: unknown reward 'numeric_answr': did you mean 'numeric_answer'? built-ins are "
        + bad_reward.stderr.split("built-ins are ", 1)[1].strip()]
    bad_data = _cli("train", "--preset", "tiny-cpu", "--dry-run", f"dataset={tmp_path / 'none.jsonl'}")
    assert bad_data.returncode == 2 and "none.jsonl" in bad_data.stderr

    hub = _cli("train", "--preset", "qwen2.5-0.5b-gsm8k", "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert hub.returncode == 0, hub.stderr  # presets still dry-run offline: hub inputs are noted
    assert "note: openai/gsm8k is a hub dataset" in hub.stderr and "hf download" in hub.stderr


def test_a_hub_model_that_is_not_downloaded_is_reported_before_anything_loads(tmp_path):
    started = time.monotonic()
    result = _cli("train", "--preset", "tiny-cpu", "--no-progress", f"output_dir={tmp_path / 'run'}",
                  "model=someone/not-in-the-cache", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "someone/not-in-the-cache is not downloaded" in line
    assert "`hf download someone/not-in-the-cache`" in line
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


def test_the_app_check_says_a_model_is_not_downloaded(tmp_path, monkeypatch):
    from lowvram_grpo.app.setup import AppContext, form_to_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    ctx = AppContext(work_dir=tmp_path)
    form = {"preset": "tiny-cpu", "model_name_or_path": "someone/not-in-the-cache", "dataset": "builtin:arith",
            "prompt_column": "prompt", "answer_column": "answer", "num_generations": 8, "max_prompt_length": 16,
            "max_completion_length": 4, "learning_rate": 1e-3, "max_steps": 5, "lora_r": 16, "beta": 0.04,
            "loss_type": "dapo", "reward_1": "arith_answer", "weight_1": 1.0, "run_name": "x"}
    config, errors = form_to_config(form, ctx)
    assert config is None
    assert "is not downloaded" in errors["model_name_or_path"]


# --- one line instead of a traceback --------------------------------------------------------------


def test_a_non_numeric_reward_weight_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rewards: the weight of 'arith_answer' must be a number.*'abc'"):
        load_config(preset="tiny-cpu", overrides=["rewards=[{name: arith_answer, weight: abc}]"])
    result = _cli("train", "--preset", "tiny-cpu", "--dry-run", "rewards=[{name: arith_answer, weight: abc}]")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_a_lone_surrogate_in_a_prompt_names_the_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "0+0=", "answer": "0"}\n{"prompt": "0+1=\\ud800", "answer": "1"}\n')
    with pytest.raises(DatasetError, match=r"line 2: the prompt holds an invalid character U\+D800"):
        read_prompt_rows(load_config(preset="tiny-cpu", overrides={"dataset": str(path)}))


def test_mixed_plain_and_conversational_prompts_are_refused(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": [{"role": "user", "content": "1+2="}], "answer": "3"}])
    with pytest.raises(DatasetError, match="mixes plain-text and conversational prompts: .*line 1 is plain text, "
                                           ".*line 2 is a conversation"):
        read_prompt_rows(load_config(preset="tiny-cpu", overrides={"dataset": str(path)}))


def test_memory_errors_from_train_are_one_line(tiny_cache, tmp_path):
    result = _cli("train", "--preset", "tiny-cpu", "--no-progress", f"output_dir={tmp_path / 'run'}",
                  "vram_gb=0.001", "micro_batch_size=auto")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: vram_gb: this run does not fit in 0.0 GB")


def test_plan_with_an_auto_chunk_size_that_cannot_fit_gives_advice():
    result = _cli("plan", "--preset", "qwen2.5-7b-gsm8k", "--vram-gb", "4", "micro_batch_size=auto")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: this run does not fit in 4 GB" in result.stderr and "choose a smaller model" in result.stderr


def test_overrides_are_accepted_anywhere_on_the_line():
    result = _cli("train", "--preset", "tiny-cpu", "lr=1e-3", "--dry-run", "max_steps=2")
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.001" in result.stdout and "max_steps: 2" in result.stdout
    stray = _cli("train", "--preset", "tiny-cpu", "--dry-rnu")
    assert stray.returncode == 2 and "unrecognized arguments: --dry-rnu" in stray.stderr


# --- the numbers a run reports -------------------------------------------------------------------


def test_metrics_of_several_iterations_are_aggregated_and_skips_counted():
    updates = [{"loss": float("nan"), "grad_norm": float("inf"), "step_skipped": 1, "entropy": 1.0},
               {"loss": 0.5, "grad_norm": 2.0, "step_skipped": 0, "entropy": 3.0}]
    result = mean_over_updates(updates)
    assert result["step_skipped"] == 1  # the first update was skipped, and it says so
    assert result["entropy"] == 2.0
    assert math.isnan(result["loss"])  # a skipped update's loss is not averaged away

    fine = mean_over_updates([{"loss": 1.0, "step_skipped": 0, "loss_scale": 4.0},
                             {"loss": 3.0, "step_skipped": 0, "loss_scale": 8.0}])
    assert fine == {"loss": 2.0, "step_skipped": 0, "loss_scale": 8.0}


def test_a_step_where_every_reward_is_none_is_warned_about_once(tiny_cache, tmp_path, capsys):
    """Warnings go through logging; the CLI shows them as `warning: ...` lines on stderr (train.log)."""
    reward_file = tmp_path / "never.py"
    reward_file.write_text("def never_applies(prompts, completions, **kw):\n    return [None] * len(completions)\n")
    assert cli.main(["train", "--preset", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--no-progress",
                     "max_steps=3", "save_every=100", f"rewards=[{reward_file}:never_applies]"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "never_applies" in warnings[0] and "all None" in warnings[0]
    assert warnings[0].startswith("warning: step 1: no reward function (")


def test_cli_warnings_show_on_the_main_process_only(monkeypatch, capsys):
    """With several processes every rank would log the same warning: only rank 0 shows it."""
    from lowvram_grpo import distributed
    from lowvram_grpo.planning import backoff

    cli.show_warnings()
    cli.show_warnings()  # once per process, however often main() runs
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    backoff.logger.warning("from rank 1")
    monkeypatch.setattr(distributed, "is_main_process", lambda: True)
    backoff.logger.warning("from rank 0")
    assert capsys.readouterr().err == "warning: from rank 0\n"


def test_a_failed_run_leaves_the_process_group_it_created(tmp_path, monkeypatch):
    from lowvram_grpo import distributed

    destroyed = []
    monkeypatch.setattr(distributed, "_world", distributed.World())
    monkeypatch.setattr(distributed, "_owns_process_group", True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(True))
    config = _config(tmp_path, vram_gb=0.001, micro_batch_size="auto")
    with pytest.raises(MemoryBudgetError, match=r"vram_gb: this run does not fit in 0\.0 GB"):
        train(config, progress=False)
    assert destroyed == [True]


def test_a_second_stop_kills_a_trainer_that_does_not_stop_and_marks_the_run(tmp_path, monkeypatch):
    from lowvram_grpo.app import jobs as jobs_module
    from lowvram_grpo.app.jobs import JobManager

    # A trainer stuck where no signal reaches it (say, C code that holds the interpreter lock).
    ignores_sigterm = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       "print('rea' + 'dy', flush=True); time.sleep(120)"]  # "ready" is not in the logged command
    monkeypatch.setattr(JobManager, "trainer_command", staticmethod(lambda args: ignores_sigterm))
    monkeypatch.setattr(jobs_module, "FORCE_STOP_AFTER", 1.0)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    rundir.write_status(run, "running", 3, 10)
    jobs = JobManager(tmp_path)
    job = jobs._launch(["train"], run)
    deadline = time.time() + 30
    while "ready" not in (run / jobs_module.LOG_NAME).read_text().splitlines() and time.time() < deadline:
        time.sleep(0.1)

    assert "Stop requested" in jobs.stop()
    assert "Press Stop again after" in jobs.stop()  # too soon: a checkpoint may be being written
    time.sleep(1.2)
    assert "ended it" in jobs.stop()
    assert not jobs.is_alive(job)
    status = rundir.read_status(run)
    assert status["state"] == "stopped" and status["step"] == 3
    assert "killed by a second Stop" in status["note"] and "no checkpoint yet" in status["note"]
