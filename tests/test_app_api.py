"""The web app driven through its API (gradio_client), the way a script or the page would.

One app for the module, served in this process on a free localhost port, with its own work
directory; training runs as a real subprocess on the tiny-cpu preset. Checks: validation errors
come back next to their fields, the memory plan (and its failure) shows as text, Start trains in
a subprocess whose curves grow (sent as updates of only the new rows), a second Start is refused, a reload reattaches, Stop leaves state
"stopped" and a checkpoint, Resume continues, and the adapter can be zipped, tried and evaluated.
"""

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio_client")
import gradio_client.exceptions  # noqa: E402  (binds gradio_client, with its exceptions loaded)

pytest.importorskip("gradio")

from conftest import apply_curve_delta  # noqa: E402

from lowvram_grpo.app import dashboard, ui  # noqa: E402
from lowvram_grpo.app import setup as app_setup  # noqa: E402

# gradio's own pandas calls warn under pandas 3; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

RUN = "api-run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll until predicate() returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def app(tiny_cache, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("app_work")
    demo = ui.launch(port=free_port(), work_dir=work_dir, prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(demo.local_url, verbose=False)
    yield client, demo, work_dir
    demo.jobs.kill_and_wait(timeout=20)
    demo.close()


def form(**changes):
    values = app_setup.preset_form_values("tiny-cpu")
    values.update(changes)
    return values


def field_errors(result) -> dict[str, str]:
    """The per-field error messages among an endpoint's outputs (the first len(ERROR_FIELDS))."""
    return {key: update["value"] for key, update in zip(ui.ERROR_FIELDS, result)
            if isinstance(update, dict) and update.get("visible")}


CURVES: dict[str, list[dict]] = {}  # what the page's curve store holds, for this client's session


def refresh(client):
    # (the buttons' updates are not among an API client's outputs)
    status, health, curves, log, checkpoints = client.predict(RUN, [], api_name="/refresh")
    if isinstance(curves, str) and curves:  # only the rows this session does not have yet (else a skip)
        apply_curve_delta(CURVES, curves)
    return {"status": status, "rows": list(CURVES.get(RUN, [])), "log": log, "checkpoints": checkpoints}


def steps_in(rows: list[dict], key: str = "reward") -> int:
    return len({r["step"] for r in rows if r.get(key) is not None})


def test_validation_errors_show_next_to_their_field(app):
    client, _, _ = app
    result = client.predict(**form(num_generations=1, learning_rate="fast", max_steps=None, vram_gb=8),
                            api_name="/check")
    errors = field_errors(result)
    assert "at least 2" in errors["num_generations"]
    assert "learning_rate" in errors["learning_rate"]
    assert "max_steps" in errors["max_steps"]
    assert "num_generations" in result[len(ui.ERROR_FIELDS)]  # and the summary lists them all

    # A reward that is not a built-in is Python code: without --allow-custom-code the reward
    # field only takes built-in names.
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):
        client.predict(**form(reward_1="my_rewards.py:fn", vram_gb=8), api_name="/check")


def test_custom_code_and_server_paths_need_opt_ins(tmp_path):
    """The same rules checked directly on the form (what a modified page could still send)."""
    data = tmp_path / "elsewhere.jsonl"
    data.write_text('{"prompt": "3+5=", "answer": "8"}\n', encoding="utf-8")
    local = app_setup.AppContext(tmp_path / "work")
    shared = app_setup.AppContext(tmp_path / "work", allow_local_paths=False)
    custom = app_setup.AppContext(tmp_path / "work", allow_custom_code=True)

    _, errors = app_setup.form_to_config(form(reward_1="my_rewards.py:fn"), local)
    assert "--allow-custom-code" in errors["reward_1"]
    _, errors = app_setup.form_to_config(form(reward_1="my_rewards.py:fn"), custom)
    assert "file not found" in errors["reward_1"]

    # code_tests runs the model's code: offered only with --allow-code-execution.
    _, errors = app_setup.form_to_config(form(reward_1="code_tests"), custom)
    assert "--allow-code-execution" in errors["reward_1"]
    executing = app_setup.AppContext(tmp_path / "work", allow_code_execution=True)
    _, errors = app_setup.form_to_config(form(reward_1="code_tests"), executing)
    assert "reward_1" not in errors
    # judge:self and reward models run nobody's code; a judge URL only from a local app.
    _, errors = app_setup.form_to_config(form(reward_1="judge:self", reward_2="model:org/rm"), local)
    assert "reward_1" not in errors and "reward_2" not in errors
    _, errors = app_setup.form_to_config(form(reward_1="judge:http://10.0.0.2:8080/v1"), shared)
    assert "--allow-custom-code" in errors["reward_1"]

    config, errors = app_setup.form_to_config(form(dataset=str(data)), local)
    assert errors == {} and config.dataset == str(data)
    _, errors = app_setup.form_to_config(form(dataset=str(data)), shared)
    assert "upload" in errors["dataset"]


def test_uploaded_dataset_without_the_prompt_column(app, tmp_path):
    client, _, work_dir = app
    data = tmp_path / "questions.csv"
    data.write_text("question,solution\n3+5=,8\n2+2=,4\n", encoding="utf-8")
    dataset, table, prompt_column, answer_column, message = client.predict(
        gradio_client.handle_file(str(data)), "prompt", "answer", api_name="/upload_dataset")
    assert Path(dataset).parent == work_dir / "uploads"  # copied under the app's own work dir
    # The preview is an update: the table and how each column shows (an image column as pictures).
    assert table["datatype"] == ["str", "str"]
    assert table["value"]["headers"] == ["question", "solution"] and len(table["value"]["data"]) == 2
    assert "question" in message

    errors = field_errors(client.predict(**form(dataset=dataset, prompt_column="prompt", answer_column="solution",
                                                vram_gb=8), api_name="/check"))
    assert "no prompt column 'prompt'" in errors["prompt_column"]
    assert "question" in errors["prompt_column"]  # the message names the columns there are

    ok = client.predict(**form(dataset=dataset, prompt_column="question", answer_column="solution", vram_gb=8),
                        api_name="/check")
    assert field_errors(ok) == {}


def test_memory_plan_and_its_failure_are_text(app, tmp_path):
    client, _, _ = app
    *_, message, headline, plan, command = client.predict(**form(vram_gb=8), api_name="/check")
    assert "valid" in message and "needs ~" in headline and "of 8 GB" in headline
    assert "Memory plan" in plan["value"] and "lowvram-grpo train --config" in command["value"]

    # A model directory without config.json: refused at the model field, before any plan.
    result = client.predict(**form(model_name_or_path=str(tmp_path), vram_gb=8), api_name="/check")
    assert "no config.json there" in field_errors(result)["model_name_or_path"]
    assert result[-3] == ""  # no memory headline for settings that cannot run


def test_start_watch_refuse_second_stop_resume(app):
    client, demo, work_dir = app
    run_dir = work_dir / "runs" / RUN
    result = client.predict(**form(max_steps=5000, run_name=RUN), api_name="/start")
    assert "Started run" in result[len(ui.ERROR_FIELDS)], result
    job = json.loads((work_dir / "job.json").read_text())
    assert job["run_dir"] == str(run_dir) and "--config" in job["command"]

    # A second Start while the first runs is refused, whatever its settings.
    second = client.predict(**form(run_name="another"), api_name="/start")
    assert "already running" in second[len(ui.ERROR_FIELDS)]
    assert not (work_dir / "runs" / "another").exists()

    # The curves appear and grow.
    first = wait_for(lambda: (r := refresh(client)) and steps_in(r["rows"]) >= 2 and r, 90, "the first steps")
    later = wait_for(lambda: (r := refresh(client)) and steps_in(r["rows"]) > steps_in(first["rows"]) + 2 and r,
                     60, "more steps")
    assert "running" in later["status"] and "ETA" in later["status"]
    assert steps_in(later["rows"], "loss") >= 2
    on_disk = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in later["rows"]] == pytest.approx([r["reward"] for r in on_disk[:len(later["rows"])]])
    assert "dataset: builtin:arith" in later["log"]

    # A reloaded page reattaches to the running job, and shows its settings in the form.
    run_value, message, *form_values = client.predict(api_name="/on_load")
    assert run_value["value"] == RUN and "Reattached" in message
    assert dict(zip(ui.FORM_KEYS, form_values))["max_steps"] == 5000

    assert "Stop requested" in client.predict(api_name="/stop")
    stopped = wait_for(lambda: (r := refresh(client)) and "stopped" in r["status"] and r, 60, "state stopped")
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    step = json.loads((run_dir / "status.json").read_text())["step"]
    assert f"checkpoint-{step:06d}" in stopped["checkpoints"]
    assert (run_dir / f"checkpoint-{step:06d}" / "adapter_model.safetensors").is_file()
    wait_for(lambda: demo.jobs.running() is None, 30, "the trainer to exit")

    # Resume continues from that checkpoint (the same run directory, a new process).
    assert "Resumed run" in client.predict(RUN, api_name="/resume")
    wait_for(lambda: json.loads((run_dir / "status.json").read_text()).get("step", 0) > step + 1, 90,
             "the resumed run to make progress")
    assert "Stop requested" in client.predict(api_name="/stop")
    wait_for(lambda: "stopped" in refresh(client)["status"], 60, "the resumed run to stop")
    wait_for(lambda: demo.jobs.running() is None, 30, "the trainer to exit")


def test_use_the_adapter(app):
    client, _, work_dir = app
    path, message = client.predict(RUN, None, api_name="/zip_adapter")
    names = zipfile.ZipFile(path).namelist()
    assert f"{RUN}-adapter/adapter_model.safetensors" in names
    assert f"{RUN}-adapter/adapter_config.json" in names
    assert not any(name.endswith("trainer_state.pt") for name in names)  # no optimizer state

    # Oracle: the greedy completions of the run's model, with the newest adapter off and on.
    prompts = ["3+5=", "0+0=", "0+1=", "1+0=", "2+7=", "9+9="]
    expected = greedy_base_and_tuned(work_dir / "runs" / RUN, prompts, 4)
    for prompt, answers in zip(prompts, expected):
        base, tuned, message = client.predict(RUN, None, prompt, 4, api_name="/try_it")
        assert "checkpoint-" in message, message
        assert (base, tuned) == answers, prompt

    # The long model work streams progress notes on the page; a script gets the final result.
    message, metrics, examples = client.predict(RUN, None, 2, api_name="/evaluate_adapter")
    assert "on 2 prompts" in message and "reward" in [row[0] for row in metrics["data"]]
    assert len(examples["data"]) == 2
    groups, message = client.predict(**form(), num_rows=1, api_name="/score_base_model")
    assert len(groups["data"]) == 8 and "mean reward" in message  # G = 8 completions of the first row


def greedy_base_and_tuned(run_dir: Path, prompts: list[str], max_new_tokens: int) -> list[tuple[str, str]]:
    """The base model's and the adapter's greedy answers to each prompt, posed as the run's
    training prompts are, with the run's newest adapter loaded on top of the run's model."""
    import torch

    from lowvram_grpo.model import load_policy, reference_model
    from lowvram_grpo.prompts import with_system_prompt
    from lowvram_grpo.rollout import generate_greedy
    from lowvram_grpo.rundir import RunDir

    adapter = RunDir(run_dir).newest_adapter()
    config = RunDir(run_dir).read_config({"adapter_path": str(adapter)})
    policy, tokenizer = load_policy(config, torch.device("cpu"), inference_only=True)

    def answer(prompt: str) -> str:  # one prompt at a time, as try-it generates
        return generate_greedy(policy.eval(), tokenizer, [with_system_prompt(prompt, config.system_prompt)],
                               max_new_tokens=max_new_tokens, max_prompt_length=config.max_prompt_length,
                               chunk_size=1).completions[0]

    with reference_model(policy):
        base = [answer(p) for p in prompts]
    tuned = [answer(p) for p in prompts]
    assert base != tuned, "the adapter changed no answer: this check could not tell them apart"
    return list(zip(base, tuned))


def test_failed_and_killed_runs_say_so(tmp_path):
    """What the page shows comes from status.json, plus the process check the file cannot do."""
    from lowvram_grpo.app.jobs import run_state, tail

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    status = {"state": "failed", "step": 3, "total_steps": 10, "pid": 1, "error": "RewardFunctionError: <boom>"}
    (run_dir / "status.json").write_text(json.dumps(status))
    html = dashboard.status_html("run", run_state(run_dir), [])
    assert "failed" in html and "RewardFunctionError: &lt;boom&gt;" in html

    # "running" in the file, but the process is gone (SIGKILL, out of memory): the page says so.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_dir / "status.json").write_text(json.dumps({**status, "state": "running", "error": None, "pid": gone.pid}))
    state = run_state(run_dir)
    assert state["state"] == "died" and "Resume" in state["error"]

    (run_dir / "train.log").write_text("a\nLoading 0%\rLoading 100%\nlast line\n")
    assert tail(run_dir / "train.log", lines=2) == "Loading 100%\nlast line"


# --- logins ------------------------------------------------------------------------------------


def _ui_args(*argv):
    from lowvram_grpo.cli import build_parser

    return build_parser().parse_args(["ui", *argv])


def test_logins_come_from_a_file_the_environment_or_the_flag(tmp_path, monkeypatch):
    from lowvram_grpo.cli import ui_logins
    from lowvram_grpo.config import ConfigError

    monkeypatch.delenv("LOWVRAM_GRPO_AUTH", raising=False)
    assert ui_logins(_ui_args()) is None
    logins = tmp_path / "logins.txt"
    logins.write_text("# who may train\nalice:s3cret\n\n  # bob too\nbob:pa:ss\n")
    assert ui_logins(_ui_args("--auth-file", str(logins))) == [("alice", "s3cret"), ("bob", "pa:ss")]
    monkeypatch.setenv("LOWVRAM_GRPO_AUTH", "carol:x")
    assert ui_logins(_ui_args()) == [("carol", "x")]
    assert ui_logins(_ui_args("--auth", "dave:y")) == [("dave", "y")]  # the flag wins over the environment

    logins.write_text("alice\n")
    with pytest.raises(ConfigError, match=r"--auth-file .*logins.txt line 1: expected USER:PASS"):
        ui_logins(_ui_args("--auth-file", str(logins)))
    with pytest.raises(ConfigError, match="cannot read"):
        ui_logins(_ui_args("--auth-file", str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="both given"):
        ui_logins(_ui_args("--auth", "a:b", "--auth-file", str(logins)))


def test_app_with_a_login_refuses_strangers(tmp_path):
    demo = ui.launch(port=free_port(), work_dir=tmp_path, auth=[("alice", "s3cret")], prevent_thread_lock=True,
                     quiet=True)
    try:
        with pytest.raises(gradio_client.exceptions.AuthenticationError, match="credentials were not provided"):
            gradio_client.Client(demo.local_url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            gradio_client.Client(demo.local_url, auth=("alice", "wrong"), verbose=False)
        client = gradio_client.Client(demo.local_url, auth=("alice", "s3cret"), verbose=False)
        assert "/start" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        demo.close()
