"""The engine, the CLI and the app's job control where POSIX-only modules are missing (native
Windows), simulated on this machine: the module or function is taken away and the fallback runs."""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lowvram_grpo import metrics, processes


def test_peak_memory_without_resource_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` now raises ImportError
    monkeypatch.setattr(metrics.sys, "platform", "win32")
    monkeypatch.setattr(metrics, "_windows_peak_working_set", lambda: 3 * 2**30)
    assert metrics.peak_memory_gb(torch.device("cpu")) == 3.0

    monkeypatch.setattr(metrics.sys, "platform", "emscripten")  # neither POSIX nor Windows
    assert metrics.peak_memory_gb(torch.device("cpu")) != metrics.peak_memory_gb(torch.device("cpu"))  # NaN


def test_peak_memory_on_linux_is_the_resident_peak():
    resident_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    assert metrics.peak_memory_gb(torch.device("cpu")) == pytest.approx(resident_kib / 2**20, rel=0.05)


def test_engine_and_cli_import_and_run_without_posix_only_modules():
    script = textwrap.dedent("""
        import os, sys
        for name in ("resource", "fcntl", "pwd", "grp", "termios"):
            sys.modules[name] = None
        del os.killpg, os.setsid
        import lowvram_grpo.cli, lowvram_grpo.trainer, lowvram_grpo.app.jobs, lowvram_grpo.metrics, lowvram_grpo.evaluate
        sys.exit(lowvram_grpo.cli.main(["presets"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny-cpu" in result.stdout


@pytest.fixture
def windows(monkeypatch):
    """processes.py as it runs on Windows, with the OS calls recorded instead of made."""
    calls = []
    monkeypatch.setattr(processes, "IS_WINDOWS", True)
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: calls.append(("kill", pid, sig)))
    monkeypatch.setattr(processes.subprocess, "run", lambda argv, **kw: calls.append(("run", argv)))
    monkeypatch.setattr(processes, "_windows_pid_alive", lambda pid: calls.append(("alive", pid)) or True)
    return calls


def test_windows_process_control(windows):
    assert processes.own_group_options() == {"creationflags": 0x200}
    assert processes.stop_signals() == (signal.SIGINT, 21)
    processes.ask_to_stop(42)
    processes.kill_group(42)
    assert processes.pid_alive(42)
    # Never os.kill(pid, 0) on Windows: it would terminate the process.
    assert windows == [("kill", 42, 1), ("run", ["taskkill", "/T", "/F", "/PID", "42"]), ("alive", 42)]


def test_posix_process_control_stops_a_process_group():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **processes.own_group_options())
    try:
        assert processes.pid_alive(child.pid)
        processes.ask_to_stop(child.pid)
        assert child.wait(10) == -signal.SIGTERM
        assert not processes.pid_alive(child.pid)
    finally:
        processes.kill_group(child.pid)
