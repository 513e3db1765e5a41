"""Errors a user can cause share one base, `UserError`, which the CLI prints as one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lowvram_grpo import cli
from lowvram_grpo.config import ConfigError
from lowvram_grpo.errors import DatasetError, UserError
from lowvram_grpo.model import ModelLoadError, ModelNotDownloaded
from lowvram_grpo.planning.backoff import MemoryBudgetError
from lowvram_grpo.planning.model_shape import PlannerError
from lowvram_grpo.rewards.base import RewardFunctionError

USER_ERRORS = [(ConfigError, ValueError), (DatasetError, ValueError), (ModelLoadError, RuntimeError),
               (ModelNotDownloaded, RuntimeError), (RewardFunctionError, RuntimeError),
               (PlannerError, ValueError), (MemoryBudgetError, RuntimeError)]


@pytest.mark.parametrize(("error", "builtin"), USER_ERRORS, ids=lambda e: e.__name__)
def test_the_cli_prints_each_user_error_as_one_line(monkeypatch, capsys, error, builtin):
    """Each is a UserError and keeps its built-in base (old `except ValueError` still catch it);
    raised inside a command, the CLI prints `error: <message>` and exits 2, no traceback."""
    assert issubclass(error, UserError) and issubclass(error, builtin)

    def command(args):
        raise error("rewards: the fix is here")

    monkeypatch.setitem(cli.COMMANDS, "presets", command)
    assert cli.main(["presets"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == "error: rewards: the fix is here\n"


def test_a_bug_is_not_a_user_error(monkeypatch):
    def command(args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "presets", command)
    with pytest.raises(KeyError):
        cli.main(["presets"])


def test_the_cli_catches_user_errors_without_loading_torch():
    code = "import sys, lowvram_grpo.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"
