"""Starting, stopping and watching a training process, on POSIX and on native Windows.

The app runs each training as a child process in a group of its own (so Ctrl-C in the app's
terminal does not reach it, and a forced stop takes its data-parallel workers with it). POSIX
does this with sessions and signals; Windows has neither `os.killpg` nor SIGTERM delivery
between processes, so there the child gets a new process group and is asked to stop with
CTRL_BREAK_EVENT (SIGBREAK in the child, which `stopping.StopRequested` listens to), and a
forced stop ends the whole tree with `taskkill /T /F`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

IS_WINDOWS = sys.platform == "win32"


def stop_signals() -> tuple[int, ...]:
    """The signals that mean "stop at the next safe point" for this platform's trainers."""
    if IS_WINDOWS:
        return (signal.SIGINT, signal.SIGBREAK)  # type: ignore[attr-defined]  # Windows only
    return (signal.SIGINT, signal.SIGTERM)


def own_group_options() -> dict:
    """subprocess.Popen options that put the child in a process group of its own."""
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {"start_new_session": True}


def ask_to_stop(pid: int) -> None:
    """Ask a trainer started with `own_group_options` to save a checkpoint and exit."""
    os.kill(pid, signal.CTRL_BREAK_EVENT if IS_WINDOWS else signal.SIGTERM)  # type: ignore[attr-defined]


def kill_group(pid: int) -> None:
    """End a trainer started with `own_group_options` at once, with every process it started."""
    if IS_WINDOWS:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pid_alive(pid: int | None) -> bool:
    """True if `pid` is a live process (a zombie, finished but not yet reaped, is not)."""
    if not pid or pid <= 0:
        return False
    if IS_WINDOWS:
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # Linux: a zombie still answers kill(0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _windows_pid_alive(pid: int) -> bool:
    # os.kill(pid, 0) would *terminate* the process on Windows: ask the kernel for its exit code.
    import ctypes

    PROCESS_QUERY_LIMITED_INFORMATION, STILL_ACTIVE = 0x1000, 259
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
