"""The app's handlers and its gradio-free parts, called directly: no server, no browser.

Each test names the problem of issue #16 it guards against (#1 ... #14). A fake run directory
(config.yaml, status.json, metrics.jsonl, completions.jsonl, checkpoints) stands in for a
training, so these run in seconds; Try rewards' base-model groups and the Use tab's eval and
merge run the built-in tiny model (a few seconds more).
"""

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")

from conftest import apply_curve_delta  # noqa: E402

from lowvram_grpo import config_docs, rundir  # noqa: E402
from lowvram_grpo.app import dashboard  # noqa: E402
from lowvram_grpo.app import setup as app_setup  # noqa: E402
from lowvram_grpo.app.handlers import Handlers  # noqa: E402
from lowvram_grpo.app.jobs import Job, JobError, JobManager  # noqa: E402
from lowvram_grpo.app.setup import ERROR_FIELDS, FORM_KEYS, AppContext  # noqa: E402
from lowvram_grpo.config import ConfigError, TrainConfig, build_config, save_config  # noqa: E402
from lowvram_grpo.errors import DatasetError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_run(runs_dir: Path, name: str, records: list[dict], state: str = "stopped", samples=(),
             checkpoints=(), **config) -> Path:
    run = runs_dir / name
    run.mkdir(parents=True)
    save_config(build_config({"output_dir": str(run), **config}), run / "config.yaml")
    (run / "status.json").write_text(json.dumps({"state": state, "step": len(records), "total_steps": 100,
                                                 "pid": None, "error": None}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "completions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    for step in checkpoints:
        ckpt = run / f"checkpoint-{step:06d}"
        ckpt.mkdir()
        (ckpt / "trainer_state.pt").write_bytes(b"")
        (ckpt / "adapter_config.json").write_text("{}")
        (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
    return run


def step_record(step: int, **values) -> dict:
    return {"step": step, "reward": 0.1 * step, "reward_std": 0.05, "kl": 0.001 * step, "loss": 0.5,
            "completions/mean_length": 10.0, "completions/clipped_ratio": 0.0, "frac_reward_zero_std": 0.1,
            "rewards/arith_answer/mean": 0.1 * step, **values}


@pytest.fixture
def handlers(tmp_path):
    ctx = AppContext(tmp_path / "work")
    ctx.runs_dir.mkdir(parents=True)
    return Handlers(ctx, JobManager(ctx.work_dir), adapter_try_it=None)


# --- curves -------------------------------------------------------------------------------------


def test_reward_curve_of_a_run_that_had_no_metrics_when_the_page_loaded(handlers):
    """#1: the page first sees the run before its first step; every later step's reward arrives."""
    run = make_run(handlers.ctx.runs_dir, "first", [], state="running")
    out = handlers.refresh("first", [], {})
    store = {}
    apply_curve_delta(store, out[2])
    assert store == {"first": []}
    sent = out[-1]
    for step in range(1, 6):
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(step_record(step)) + "\n")
        out = handlers.refresh("first", [], sent)
        apply_curve_delta(store, out[2])
        sent = out[-1]
    assert [r["reward"] for r in store["first"]] == pytest.approx([0.1 * s for s in range(1, 6)])
    assert [r["step"] for r in store["first"]] == [1, 2, 3, 4, 5]
    assert dashboard.CURVES[0]["series"] == ["reward"] and dashboard.CURVES[0]["band"] == "reward_std"


def test_refresh_sends_only_new_rows(handlers):
    """#14: with 300 steps on the page, one new step sends one row; no new step sends nothing."""
    run = make_run(handlers.ctx.runs_dir, "long", [step_record(s) for s in range(1, 301)], state="running")
    first = handlers.refresh("long", [], {})
    assert len(json.loads(first[2])["runs"]["long"]["rows"]) == 300
    again = handlers.refresh("long", [], first[-1])
    assert again[2] is not first[2] and again[2].__class__.__name__ != "str"  # gr.skip(): nothing to send
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(step_record(301)) + "\n")
    update = handlers.refresh("long", [], first[-1])[2]
    assert len(json.loads(update)["runs"]["long"]["rows"]) == 1
    assert len(update) < 2500, len(update)


def test_overlay_sends_each_compared_run(handlers):
    make_run(handlers.ctx.runs_dir, "a", [step_record(s) for s in range(1, 4)])
    make_run(handlers.ctx.runs_dir, "b", [step_record(s, reward=1.0) for s in range(1, 6)])
    store = {}
    delta = apply_curve_delta(store, handlers.refresh("a", ["b", "not-a-run"], {})[2])
    assert delta["selected"] == ["a", "b"]
    assert len(store["a"]) == 3 and [r["reward"] for r in store["b"]] == [1.0] * 5


def test_resumed_run_is_sent_again_from_its_first_step(handlers):
    """A resumed run rewrites metrics.jsonl (steps after its checkpoint are redone): the page gets
    the run again from step 1, even when the file has grown past its old length between two
    refreshes, so no old row of a redone step stays on the page."""
    run = make_run(handlers.ctx.runs_dir, "r", [step_record(s) for s in range(1, 11)], state="running")
    store = {}
    out = handlers.refresh("r", [], {})
    apply_curve_delta(store, out[2])
    rundir.truncate_jsonl_after_step(run / "metrics.jsonl", 5)
    with (run / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(step_record(s, reward=-1.0)) + "\n" for s in range(6, 13)))
    delta = apply_curve_delta(store, handlers.refresh("r", [], out[-1])[2])
    assert delta["runs"]["r"]["start"] == 0
    assert [r["step"] for r in store["r"]] == list(range(1, 13))
    assert [r["reward"] for r in store["r"]] == pytest.approx([0.1 * s for s in range(1, 6)] + [-1.0] * 7)


def test_refresh_reads_only_the_new_lines(handlers, monkeypatch):
    """The server parses each line of metrics.jsonl once, not the whole file every refresh."""
    run = make_run(handlers.ctx.runs_dir, "long", [step_record(s) for s in range(1, 301)], state="running")
    parsed = []
    real = rundir._records
    monkeypatch.setattr(rundir, "_records", lambda data: parsed.append(data.count(b"\n")) or real(data))
    sent = handlers.refresh("long", [], {})[-1]
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(step_record(301)) + "\n")
    handlers.refresh("long", [], sent)
    handlers.refresh("long", [], {})  # a second page opening on the run: nothing to read again
    assert sum(parsed) == 301  # each line of metrics.jsonl once (completions.jsonl is empty)


# --- run state and buttons ----------------------------------------------------------------------


def test_buttons_follow_the_run_state(handlers):
    """#4: Stop only while training; Resume only for a run that ended early; more steps when finished."""
    finished = dashboard.buttons_for("finished", has_checkpoint=True, job_running=False)
    assert (finished.stop, finished.resume, finished.more_steps) == (False, False, True)
    failed = dashboard.buttons_for("failed", has_checkpoint=False, job_running=False)
    assert (failed.stop, failed.resume, failed.more_steps) == (False, False, False)
    assert dashboard.buttons_for("running", True, True).stop
    assert dashboard.buttons_for("stopped", True, False).resume

    make_run(handlers.ctx.runs_dir, "done", [step_record(1)], state="finished", checkpoints=[1])
    out = handlers.refresh("done", [], {})
    stop, resume, more = out[5:8]
    assert stop["interactive"] is False and resume["interactive"] is False and more["interactive"] is True


def test_resume_refuses_a_finished_run(handlers):
    """#4: Resume on a finished run does not start the trainer again."""
    make_run(handlers.ctx.runs_dir, "done", [step_record(1)], state="finished", checkpoints=[1])
    assert "finished all its steps" in handlers.resume("done")
    assert handlers.jobs.current() is None  # nothing was launched
    with pytest.raises(JobError, match="has not finished"):
        make_run(handlers.ctx.runs_dir, "half", [step_record(1)], state="stopped", checkpoints=[1])
        handlers.jobs.continue_run(handlers.ctx.runs_dir / "half", 10)


def test_continue_a_finished_run_for_more_steps(handlers, tiny_cache):
    """A finished run continued for N more steps (the button's handler, a real trainer process)
    ends at step old+N, finished, with every step's metrics exactly once; the page shows them."""
    from lowvram_grpo.config import load_config
    from lowvram_grpo.trainer import train

    run = handlers.ctx.runs_dir / "done"
    train(load_config(preset="tiny-cpu", overrides={"output_dir": str(run), "max_steps": 3}), progress=False)
    assert "for 2 more steps" in handlers.more_steps("done", 2)
    deadline = time.time() + 240
    while handlers.jobs.running() is not None and time.time() < deadline:
        time.sleep(0.5)
    log = (run / "train.log").read_text(errors="replace")
    assert handlers.jobs.running() is None, "the continued run did not end in time:\n" + log
    status = rundir.read_status(run)
    assert (status["state"], status["step"], status["total_steps"]) == ("finished", 5, 5), log
    assert [r["step"] for r in rundir.read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    out = handlers.refresh("done", [], {})
    assert "finished" in out[0] and "step 5 / 5" in out[0]
    store = {}
    apply_curve_delta(store, out[2])
    assert [r["step"] for r in store["done"]] == [1, 2, 3, 4, 5]
    assert out[7]["interactive"] is True  # it can be continued again


def test_log_is_shown_in_a_pre_the_page_scrolls_to_its_end(handlers):
    """#3: the log box is an element the page scrolls to its end on every update (LOG_JS)."""
    from lowvram_grpo.app import ui

    run = make_run(handlers.ctx.runs_dir, "r", [])
    (run / "train.log").write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback <last>\n")
    log = handlers.refresh("r", [], {})[3]
    assert log.startswith("<pre class='log'>") and log.rstrip("</pre>").endswith("Traceback &lt;last&gt;")
    assert "scrollTop = pre.scrollHeight" in ui.LOG_JS and "watch('value'" in ui.LOG_JS


# --- set up -------------------------------------------------------------------------------------


def test_every_config_key_is_in_the_form_and_round_trips(handlers):
    """#9: every setting can be seen and changed; the form gives back the config it was filled from."""
    keys = set(TrainConfig.__dataclass_fields__) - {"rewards", "output_dir"}
    assert keys <= set(FORM_KEYS)
    groups = dict(config_docs.key_groups())
    assert "temperature" in groups["generation (rollouts)"] and "prompts_per_step" in groups["optimisation"]
    values = {**TrainConfig().to_dict(), "system_prompt": "Answer with a number.", "temperature": 0.7,
              "prompts_per_step": 2, "lr_scheduler": "linear", "eval_fraction": 0.1, "eval_every": 5,
              "generation_chunk_size": "auto", "micro_batch_size": 2, "lora_target_modules": ["q_proj", "v_proj"],
              "epsilon_high": 0.28, "report_to": ["tensorboard"], "vram_gb": 12.0,
              "rewards": [{"name": "arith_answer", "weight": 0.5}, {"name": "format_soft", "weight": 1.0}]}
    form = app_setup.config_to_form(values, run_name="round-trip")
    config, errors = app_setup.form_to_config(form, handlers.ctx, check_data=False, check_model=False)
    assert errors == {}
    expected = build_config({**values, "output_dir": config.output_dir})
    assert config == expected


def test_errors_carry_their_key_and_mark_their_field(handlers):
    """Errors name the key they are about (no message parsing in the app); #6: the page marks the field."""
    from lowvram_grpo.app import ui

    assert ConfigError("temperature: must be > 0").key == "temperature"
    assert ConfigError("override 'x': expected key=value").key == "config"
    assert DatasetError("no prompt column 'q'", key="prompt_column").key == "prompt_column"
    form = app_setup.preset_form_values("tiny-cpu")
    form.update(temperature="-1", top_k="many", num_generations=1)
    _, errors = app_setup.form_to_config(form, handlers.ctx, check_data=False, check_model=False)
    assert {"temperature", "top_k", "num_generations"} <= set(errors)
    assert ".form:has(+ .field-error) > .block" in ui.CSS  # the field itself gets a red outline
    assert "0.9em" not in ui.CSS  # the nested relative size that rendered at ~8 px


def test_changing_the_preset_clears_the_previous_preview(handlers):
    """#5: a preset with a hub dataset empties the preview table instead of keeping the old one."""
    table, *_, note = handlers.auto_preview("openai/gsm8k", "question", "answer")
    assert table.empty and "Press Preview" in note


def test_reload_during_training_restores_the_form(handlers, monkeypatch):
    """#7: a reloaded page shows the running run's settings (upload, rewards), not the defaults."""
    upload = handlers.ctx.subdir("uploads") / "sums.jsonl"
    upload.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    run = make_run(handlers.ctx.runs_dir, "live", [], state="running", dataset=str(upload), temperature=0.7,
                   rewards=[{"name": "arith_answer", "weight": 1.0}, {"name": "format_soft", "weight": 0.2}])
    monkeypatch.setattr(handlers.jobs, "running", lambda: Job(pid=1, run_dir=str(run), command=[]))
    run_update, message, *form_values = handlers.on_load()
    form = dict(zip(FORM_KEYS, form_values))
    assert run_update["value"] == "live" and "Reattached" in message
    assert form["dataset"] == str(upload) and form["temperature"] == "0.7"
    assert (form["reward_2"], form["weight_2"]) == ("format_soft", 0.2)
    assert form["run_name"] == ""  # a new run needs a new name


def test_memory_headline_describes_the_chunk_sizes_the_run_uses(handlers):
    """#8: fixed chunk sizes are the ones planned; "auto" ones are the planner's choice, which the
    run makes for the same vram_gb."""
    from lowvram_grpo.planning.planner import plan

    form = app_setup.preset_form_values("tiny-cpu")
    form.update(vram_gb=8, generation_chunk_size="2", micro_batch_size="4")
    config, errors = app_setup.form_to_config(form, handlers.ctx, check_data=False, check_model=False)
    headline, _ = app_setup.memory_plan(config)
    assert "generation_chunk_size=2, micro_batch_size=4" in headline

    form.update(generation_chunk_size="auto", micro_batch_size="auto")
    config, _ = app_setup.form_to_config(form, handlers.ctx, check_data=False, check_model=False)
    chosen = plan(config, 8)
    headline, _ = app_setup.memory_plan(config)
    assert f"generation_chunk_size={chosen.generation_chunk_size}, micro_batch_size={chosen.micro_batch_size}" \
        in headline
    assert config.vram_gb == 8  # the run plans "auto" for the same memory the page planned with


def test_a_model_without_downloaded_weights_is_not_valid_offline(handlers, tmp_path, monkeypatch):
    """#10: offline, a hub model with only config.json in the cache fails the check, not Start."""
    snapshot = tmp_path / "hub" / "models--someone--half-cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "qwen2"}')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    form = app_setup.preset_form_values("tiny-cpu")
    form["model_name_or_path"] = "someone/half-cached"
    _, errors = app_setup.form_to_config(form, handlers.ctx, check_data=False)
    assert "weights are not downloaded" in errors["model_name_or_path"]
    (snapshot / "model.safetensors").write_bytes(b"")
    assert app_setup.missing_weights("someone/half-cached") is None


def test_an_empty_memory_field_means_not_set(handlers):
    """The page sends 0 for the empty "GPU memory" number field: that is "what the GPU has free",
    not a 0 GB budget that fails the check."""
    form = app_setup.preset_form_values("tiny-cpu")
    form.update(vram_gb=0)
    config, errors = app_setup.form_to_config(form, handlers.ctx, check_data=False, check_model=False)
    assert errors == {} and config.vram_gb is None


def test_check_shows_the_cli_command_and_config_yaml(handlers):
    """#9: what Start will run is shown before Start."""
    form = app_setup.preset_form_values("tiny-cpu")
    form.update(run_name="shown", vram_gb=8)
    out = handlers.check(*[form[k] for k in FORM_KEYS])
    message, _, _, command = out[len(ERROR_FIELDS):]
    assert "valid" in message
    assert "lowvram-grpo train --config" in command["value"] and "runs/shown/config.yaml" in command["value"]
    assert "temperature: 1.0" in command["value"]


def test_theme_text_contrast_is_at_least_4_5(tmp_path):
    """#13: help text and other subdued text at >= 4.5:1 on the white background (WCAG AA)."""
    from lowvram_grpo.app import ui

    def resolve(value: str) -> str:
        while value.startswith("*"):
            value = getattr(ui.THEME, value[1:])
        return value

    def luminance(hex_colour: str) -> float:
        rgb = [int(hex_colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    for name in ("block_info_text_color", "body_text_color_subdued", "input_placeholder_color",
                 "block_label_text_color", "body_text_color"):
        colour = resolve(getattr(ui.THEME, name))
        ratio = (1.05) / (luminance(colour) + 0.05)
        assert ratio >= 4.5, f"{name} = {colour}: contrast {ratio:.2f}"


# --- runs, completions, adapters, try rewards ---------------------------------------------------


def test_runs_table_clone_and_delete(handlers, monkeypatch):
    make_run(handlers.ctx.runs_dir, "old", [step_record(s) for s in range(1, 5)], temperature=0.5)
    table, *_ = handlers.runs_table()
    row = table.set_index("run").loc["old"]
    assert row["state"] == "stopped" and row["steps"] == "4 / 100"
    assert row["last reward"] == pytest.approx(0.4) and row["best reward"] == pytest.approx(0.4)

    *form_values, message, _ = handlers.clone("old")
    assert dict(zip(FORM_KEYS, form_values))["temperature"] == "0.5" and "copied" in message

    assert "Tick" in handlers.delete("old", False) and (handlers.ctx.runs_dir / "old").exists()
    monkeypatch.setattr(handlers.jobs, "running",
                        lambda: Job(pid=1, run_dir=str(handlers.ctx.runs_dir / "old"), command=[]))
    assert "stop it first" in handlers.delete("old", True)
    monkeypatch.setattr(handlers.jobs, "running", lambda: None)
    assert "Deleted" in handlers.delete("old", True) and not (handlers.ctx.runs_dir / "old").exists()


def test_completions_browser_filters(handlers):
    samples = [{"step": s, "prompt": f"{s}+1=", "completion": f"{s + 1} ok" if s % 2 else "wrong",
                "reward": float(s % 2), "advantage": 0.5, "rewards": {"arith_answer": float(s % 2), "fmt": 1.0}}
               for s in range(1, 11)]
    make_run(handlers.ctx.runs_dir, "c", [step_record(1)], samples=samples)
    table, functions, message, trajectories = handlers.completions("c", 3, 8, 1.0, "arith_answer", "")
    assert list(table["step"]) == [7, 5, 3] and "3 of 10" in message
    assert functions["choices"] == ["", "arith_answer", "fmt"]
    assert trajectories == ""  # single-turn completions have no turns to show
    table, *_ = handlers.completions("c", "", " ", "", "", "wrong")  # empty fields: no filter
    assert list(table["step"]) == [10, 8, 6, 4, 2]
    assert "arith_answer 1" in handlers.completions("c", "1", "1", None, "", "")[0]["rewards"][0]
    assert "not a number" in handlers.completions("c", "one", "", "", "", "")[2]


def test_adapter_picker(handlers, tmp_path):
    """#11: the Use tab picks a run and one of its checkpoints (or final)."""
    run = make_run(handlers.ctx.runs_dir, "a", [step_record(1)], checkpoints=[10, 20])
    update = handlers.adapters("a")
    assert update["choices"] == ["checkpoint-000020", "checkpoint-000010"] and update["value"] == "checkpoint-000020"
    path, message = handlers.zip("a", "checkpoint-000010")
    assert "checkpoint-000010" in path and "checkpoint-000010" in message
    assert dashboard.pick_adapter(run, "../../etc") == run / "checkpoint-000020"  # only the run's own adapters


def test_try_rewards_scores_pasted_completions_as_a_group(handlers):
    columns_in = ["arith_answer", 1.0, "", 1.0, "", 1.0]
    table, message = handlers.score_rewards(*columns_in, "3+5=", "8", "8\n---\n9\n---\n", "group", None)
    assert list(table.columns) == ["completion", "arith_answer", "total", "advantage"]
    assert list(table["completion"]) == ["8", "9"]
    right, wrong = table["advantage"]
    assert table["arith_answer"][0] > table["arith_answer"][1] and right > 0 > wrong
    assert "⚠" in handlers.score_rewards("my.py:fn", 1.0, "", 1.0, "", 1.0, "p", "a", "x", "group", None)[1]


# --- run health (the rules themselves: tests/test_health.py) ------------------------------------


def test_health_warning_shows_on_the_page(handlers):
    make_run(handlers.ctx.runs_dir, "stuck", [step_record(s, frac_reward_zero_std=1.0, reward=0.0)
                                              for s in range(1, 21)])
    shown = handlers.refresh("stuck", [], {})[1]
    assert "Run health" in shown and "frac_reward_zero_std" in shown


# --- the tiny model: Try rewards' base-model groups, the Use tab's eval and merge ----------------


def last(updates):
    """A generator handler's final outputs, after checking that it showed progress first."""
    updates = list(updates)
    first_message = next(u for u in updates[0] if isinstance(u, str))
    assert len(updates) >= 2 and first_message.startswith("⏳"), updates[0]
    return updates[-1]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_cache, tmp_path_factory):
    """A tiny-cpu adapter that changes the model's answers (random LoRA B; no training)."""
    import torch

    from lowvram_grpo.config import load_config
    from lowvram_grpo.model import load_policy

    torch.manual_seed(0)  # LoRA A's initialisation too: the same adapter whatever ran before
    policy, _ = load_policy(load_config(preset="tiny-cpu"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = tmp_path_factory.mktemp("adapter") / "final"
    policy.save_pretrained(adapter)
    return adapter


def tiny_run(handlers, adapter: Path, **config) -> Path:
    import shutil

    from lowvram_grpo.config import load_config

    run = handlers.ctx.runs_dir / "tiny"
    run.mkdir()
    save_config(load_config(preset="tiny-cpu", overrides={"output_dir": str(run), **config}), run / "config.yaml")
    shutil.copytree(adapter, run / "final")
    return run


def test_try_rewards_scores_the_base_models_groups(handlers, tiny_cache, monkeypatch):
    """Before any training: G completions of the form's model for each of the dataset's first
    rows, each with the reward arith_answer gives it and its group advantage; the model loads once."""
    import statistics

    import lowvram_grpo.model
    from lowvram_grpo.data import read_table
    from lowvram_grpo.grpo import ADVANTAGE_EPS
    from lowvram_grpo.rewards.builtins import arith_answer

    loads = []
    real_load = lowvram_grpo.model.load_policy
    monkeypatch.setattr(lowvram_grpo.model, "load_policy", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    form = app_setup.preset_form_values("tiny-cpu")
    form["run_name"] = "taken"
    (handlers.ctx.runs_dir / "taken").mkdir()  # the name of a run just started is no problem here
    table, message = last(handlers.score_base_model(*[form[k] for k in FORM_KEYS], 2))
    assert list(table.columns) == ["row", "prompt", "answer", "completion", "arith_answer", "total", "advantage"]
    assert list(table["row"]) == [1] * 8 + [2] * 8  # G = the form's num_generations
    first_rows = read_table("builtin:arith")[:2]  # as the Set-up preview shows them
    assert list(table["prompt"][::8]) == [r["prompt"] for r in first_rows]
    assert list(table["answer"][::8]) == [r["answer"] for r in first_rows]
    for _, group in table.groupby("row"):
        expected = arith_answer(list(group["prompt"]), list(group["completion"]), answer=list(group["answer"]))
        assert list(group["arith_answer"]) == list(group["total"]) == pytest.approx(expected)
        rewards = list(group["total"])
        spread = statistics.stdev(rewards)
        advantages = [(r - statistics.mean(rewards)) / (spread + ADVANTAGE_EPS) for r in rewards]
        assert list(group["advantage"]) == pytest.approx(advantages, abs=1e-3)
    assert f"mean reward {table['total'].mean():.3f}" in message and "`builtin:tiny` (no adapter)" in message

    table, _ = last(handlers.score_base_model(*[form[k] for k in FORM_KEYS], 1))
    assert len(table) == 8 and len(loads) == 1  # the second click reuses the loaded model

    assert list(handlers.score_base_model(*[form[k] for k in FORM_KEYS], 0))[-1][1] == \
        "⚠ rows: give 1 to 8 (each row gets G completions)"
    form["temperature"] = "-1"
    _, message = list(handlers.score_base_model(*[form[k] for k in FORM_KEYS], 2))[-1]
    assert "on Set up first" in message and "temperature" in message


def test_model_slot_holds_one_model():
    from lowvram_grpo.app.use_adapter import ModelSlot

    slot, loads = ModelSlot(), []
    assert slot.get("a", lambda: loads.append("a") or "model a") == "model a"
    assert slot.get("a", lambda: loads.append("a") or "again") == "model a"
    assert slot.get("b", lambda: loads.append("b") or "model b") == "model b"
    assert loads == ["a", "b"]
    slot.clear()
    assert slot.get("b", lambda: loads.append("b") or "model b") == "model b" and loads == ["a", "b", "b"]


def test_use_tab_evaluates_base_vs_adapter_on_held_out_prompts(handlers, tiny_adapter):
    from lowvram_grpo.data import load_prompt_data
    from lowvram_grpo.rewards.builtins import arith_answer
    from lowvram_grpo.rundir import RunDir

    run = tiny_run(handlers, tiny_adapter, eval_fraction=0.01)  # 10 of builtin:arith's 1000 rows
    message, table, examples = last(handlers.evaluate("tiny", "final", 4))
    assert "`final` on 4 prompts" in message and "held-out" in message
    metrics = table.set_index("metric")
    assert {"reward", "rewards/arith_answer/mean", "accuracy"} <= set(metrics.index)
    assert list(examples.columns) == ["prompt", "answer", "base model", "with the adapter"]
    held_out = load_prompt_data(RunDir(run).read_config()).eval[:4]
    assert list(examples["prompt"]) == [r["prompt"] for r in held_out]
    # The metrics are those of the answers shown (all 4 prompts are shown).
    for column in ("base model", "with the adapter"):
        rewards = arith_answer(list(examples["prompt"]), list(examples[column]), answer=list(examples["answer"]))
        assert metrics.loc["rewards/arith_answer/mean", column] == pytest.approx(sum(rewards) / 4, abs=1e-4)
    assert list(examples["base model"]) != list(examples["with the adapter"])  # the adapter matters
    row = metrics.loc["reward"]
    assert row["change"] == pytest.approx(row["with the adapter"] - row["base model"], abs=1e-3)
    assert f"{row['base model']:.3f} (base) → {row['with the adapter']:.3f} (adapter)" in message

    assert "choose a run" in list(handlers.evaluate("nope", None, 4))[-1][0]


def test_use_tab_merges_the_adapter_into_a_directory(handlers, tiny_adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tiny_run(handlers, tiny_adapter)
    message = last([[m] for m in handlers.merge("tiny", "final", "my-model", "float32")])[0]
    out = handlers.ctx.work_dir / "exports" / "my-model"
    assert f"Saved the merged model to `{out}`" in message and "convert_hf_to_gguf.py" in message
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())

    again = list(handlers.merge("tiny", "final", "my-model", "float32"))
    assert len(again) == 1 and again[0] == f"⚠ {out} already exists and is not empty: choose another directory " \
                                           "(nothing is overwritten)"
    assert "give a directory" in list(handlers.merge("tiny", "final", " ", "float16"))[0]
    shared = Handlers(AppContext(handlers.ctx.work_dir, allow_local_paths=False), handlers.jobs)
    refused = list(shared.merge("tiny", "final", str(tmp_path / "elsewhere"), "float16"))[0]
    assert "this app is shared" in refused and not (tmp_path / "elsewhere").exists()
