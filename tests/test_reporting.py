"""report_to integrations, with fake wandb / trackio / tensorboard modules: no network, no installs.

Each fake records the calls made to it, so the tests check what a real dashboard would receive.
"""

import math
import sys
import types

import pytest

from lowvram_grpo.config import ConfigError
from lowvram_grpo.reporting import ReporterUnavailableError, make_reporters

CONFIG = {"model_name_or_path": "builtin:tiny", "learning_rate": 1e-5}
METRICS = {"step": 3, "reward": 0.5, "kl": 0.01, "num_prompts_truncated": 2, "entropy": None,
           "grad_norm": float("nan"), "note": "text", "step_skipped": False}
LOGGED = {"reward": 0.5, "kl": 0.01, "num_prompts_truncated": 2.0}  # numbers only, finite, no step
RECORDS = [
    {"step": 3, "prompt": "1+1=", "completion": "2", "reward": 1.0, "advantage": 0.5,
     "rewards": {"arith_answer": 1.0}},
    {"step": 3, "prompt": [{"role": "user", "content": "2+2="}], "completion": "5", "reward": 0.0,
     "advantage": -0.5, "rewards": {"arith_answer": 0.0}},
]
COLUMNS = ["step", "prompt", "completion", "reward", "advantage", "rewards/arith_answer"]


class Table:
    def __init__(self, columns=None, data=None):
        self.columns, self.data = columns, data


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.calls = []
    module.Table = Table

    class Run:
        id = "run123"

        def log(self, data, step=None):
            module.calls.append(("log", data, step))

        def finish(self):
            module.calls.append(("finish",))

    def init(**kwargs):
        module.calls.append(("init", kwargs))
        return Run()

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.fixture
def fake_trackio(monkeypatch):
    module = types.ModuleType("trackio")
    module.calls = []
    module.Table = Table
    module.init = lambda **kwargs: module.calls.append(("init", kwargs))
    module.log = lambda data, step=None: module.calls.append(("log", data, step))
    module.finish = lambda: module.calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", module)
    return module


@pytest.fixture
def fake_tensorboard(monkeypatch):
    """Stands in for torch.utils.tensorboard, which needs the (optional) tensorboard package."""
    module = types.ModuleType("torch.utils.tensorboard")
    module.calls = []

    class SummaryWriter:
        def __init__(self, log_dir):
            module.calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            module.calls.append(("scalar", tag, value, step))

        def add_text(self, tag, text, step):
            module.calls.append(("text", tag, text, step))

        def flush(self):
            pass

        def close(self):
            module.calls.append(("close",))

    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return module


def test_wandb_gets_config_metrics_completions_and_finish(fake_wandb, tmp_path):
    run_dir = tmp_path / "run"
    reporters = make_reporters(["wandb"], run_dir, CONFIG)
    reporters.log(METRICS, step=3)
    reporters.log_completions(RECORDS, step=3)
    reporters.close()

    (init, kwargs), log, table_log, finish = fake_wandb.calls
    assert kwargs["project"] == "lowvram-grpo" and kwargs["config"] == CONFIG
    assert kwargs["dir"] == str(run_dir) and kwargs["name"] == "run"
    assert log == ("log", LOGGED, 3)
    table = table_log[1]["completions"]
    assert table.columns == COLUMNS and table_log[2] == 3
    assert table.data[0] == [3, "1+1=", "2", 1.0, 0.5, 1.0]
    assert table.data[1][1] == '[{"role": "user", "content": "2+2="}]'  # conversations as JSON text
    assert finish == ("finish",)


def test_wandb_resumed_run_continues_the_same_wandb_run(fake_wandb, tmp_path):
    make_reporters(["wandb"], tmp_path, CONFIG).close()
    make_reporters(["wandb"], tmp_path, CONFIG).close()
    first, second = [c[1] for c in fake_wandb.calls if c[0] == "init"]
    assert "id" not in first
    assert second["id"] == "run123" and second["resume"] == "allow"


def test_trackio_gets_config_metrics_and_completions(fake_trackio, tmp_path):
    with make_reporters(["trackio"], tmp_path / "run", CONFIG) as reporters:
        reporters.log(METRICS, step=7)
        reporters.log_completions(RECORDS, step=7)
    (_, kwargs), log, table_log, finish = fake_trackio.calls
    assert kwargs["project"] == "lowvram-grpo" and kwargs["config"] == CONFIG and kwargs["name"] == "run"
    assert log == ("log", LOGGED, 7)
    assert table_log[1]["completions"].columns == COLUMNS and table_log[2] == 7
    assert finish == ("finish",)


def test_tensorboard_writes_scalars_and_a_completions_table(fake_tensorboard, tmp_path):
    with make_reporters(["tensorboard"], tmp_path, CONFIG) as reporters:
        reporters.log(METRICS, step=2)
        reporters.log_completions(RECORDS, step=2)
    calls = fake_tensorboard.calls
    assert calls[0] == ("init", str(tmp_path / "tensorboard"))
    scalars = {(tag, value, step) for kind, tag, value, step in (c for c in calls if c[0] == "scalar")}
    assert scalars == {(k, v, 2) for k, v in LOGGED.items()}
    texts = {c[1]: c[2] for c in calls if c[0] == "text"}
    assert "learning_rate" in texts["config"]
    assert "| 3 | 1+1= | 2 |" in texts["completions"]
    assert calls[-1] == ("close",)


def test_real_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with make_reporters(["tensorboard"], tmp_path, CONFIG) as reporters:
        reporters.log(METRICS, step=1)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("trackio", "trackio"),
                                          ("tensorboard", "torch.utils.tensorboard")])
def test_missing_package_is_a_one_line_error_with_the_install_command(name, module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import` fail as if not installed
    with pytest.raises(ReporterUnavailableError) as info:
        make_reporters([name], tmp_path, CONFIG)
    message = str(info.value)
    assert f"pip install {name}" in message and "\n" not in message
    # The CLI prints ConfigErrors as one line; `except ImportError` also catches it.
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ImportError)


def test_a_failing_integration_closes_those_already_started(fake_wandb, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(ReporterUnavailableError, match="trackio"):
        make_reporters(["wandb", "trackio"], tmp_path, CONFIG)
    assert fake_wandb.calls[-1] == ("finish",)


def test_nothing_requested_needs_nothing_installed(monkeypatch, tmp_path):
    for module in ("wandb", "trackio", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    reporters = make_reporters([], tmp_path / "run", CONFIG)
    reporters.log(METRICS, step=1)
    reporters.log_completions(RECORDS, step=1)
    reporters.close()
    assert reporters.names == [] and not (tmp_path / "run").exists()


def test_unknown_integration_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="mlflow"):
        make_reporters(["mlflow"], tmp_path, CONFIG)


def test_a_dashboard_failing_mid_run_warns_and_the_others_go_on(fake_wandb, fake_trackio, tmp_path, caplog):
    reporters = make_reporters(["wandb", "trackio"], tmp_path, CONFIG)

    def broken(*args, **kwargs):
        raise ConnectionError("network down")

    reporters.backends[0].run.log = broken
    reporters.log({"reward": 1.0}, step=1)
    reporters.log({"reward": 2.0}, step=2)
    assert reporters.names == ["trackio"]
    assert [c[1:] for c in fake_trackio.calls if c[0] == "log"] == [({"reward": 1.0}, 1), ({"reward": 2.0}, 2)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "lowvram_grpo.reporting"]
    assert len(warnings) == 1 and warnings[0].startswith("wandb logging failed") and "network down" in warnings[0]
    reporters.close()


def test_numbers_only_reach_the_dashboards():
    from lowvram_grpo.reporting import numeric_metrics

    assert numeric_metrics(METRICS) == LOGGED
    assert numeric_metrics({"a": float("inf"), "b": 1, "c": -math.inf}) == {"b": 1.0}
