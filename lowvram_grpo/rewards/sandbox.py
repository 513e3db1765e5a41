"""Run untrusted programs (a model's code) in a confined child process.

    result = run_program({"main.py": code}, ["main.py"], stdin="3 4\\n", limits=SandboxLimits())

Each run gets a fresh working directory, an empty environment (nothing of the trainer's:
no tokens, no keys), limits on CPU time, wall time, memory, processes, open files and file
size, and, where the OS allows, no network and no view of the machine's files or processes.
On timeout the whole process group is killed, and no process the program started outlives
the call. The confinement itself happens in the child (`_sandbox_child.py`); this module starts
it, enforces the wall time, caps the output it reads back, and cleans up.

What holds where (`isolation_report()` says what holds on this machine):
- Always: the resource limits, the empty environment, the killed process group, a working
  directory removed afterwards, output capped at `output_bytes`.
- As root (Colab, containers), with namespaces allowed: no network, every mount read-only
  with a private /tmp, a private /proc, every process it started killed with it, and the
  program runs as an unprivileged uid of its own (so RLIMIT_NPROC binds).
- As another user with unprivileged user namespaces (most desktop Linux): the same, except
  that the program keeps your uid (files it could write are read-only to it anyway).
- Without namespaces (some containers forbid them): limits and environment only; the program
  could reach the network and write where the trainer's user can. `isolation_report()` and
  the run's first log line say so.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
# The uids programs run as when the trainer is root: one per parallel slot, so RLIMIT_NPROC
# (counted per uid) is the program's own, and leftovers can be found by uid. Chosen outside
# the ranges distributions give to users (1000+) and systemd/containers (65536-..., 524288+).
SANDBOX_UID_BASE = 2_000_000_000
FALLBACK_UID = 65534  # nobody, where the uids above cannot be used (inside a user namespace)
EXIT_SETUP_FAILED = 125  # the child could not confine itself; see its stderr


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. The defaults suit a short test of a short function."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20  # address space (RLIMIT_AS)
    processes: int = 16
    open_files: int = 64
    file_bytes: int = 1 * 2**20  # largest file it may write (RLIMIT_FSIZE)
    tmp_bytes: int = 16 * 2**20  # size of its private /tmp, working directory included
    output_bytes: int = 64 * 2**10  # stdout and stderr kept, each


@dataclass
class SandboxResult:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float


class SandboxError(RuntimeError):
    """The sandbox itself could not start (not: the program failed)."""


def default_workers() -> int:
    """Programs run at once: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Slots:
    """Slot numbers for parallel runs, so two runs at once never share a uid."""

    def __init__(self):
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                self._next += 1
                return self._next - 1

    def release(self, slot: int) -> None:
        self._free.put(slot)


_slots = _Slots()


def run_program(files: dict[str, str], argv: list[str], stdin: str = "",
                limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `argv` (argv[0] a file name in `files`, run with this Python, or an absolute path)
    confined, with `files` in its working directory and `stdin` as its input."""
    if argv and argv[0] in files:
        argv = [sys.executable, "-I", *argv]  # -I: ignore PYTHON* variables and the user's site
    slot = _slots.acquire()
    base = Path(tempfile.mkdtemp(prefix="lowvram-sandbox-"))
    try:
        return _run(files, argv, stdin, limits, slot, base)
    finally:
        _slots.release(slot)
        shutil.rmtree(base, ignore_errors=True)


def _run(files, argv, stdin, limits, slot, base: Path, probe: bool = False) -> SandboxResult:
    uid = gid = _sandbox_uid(slot)
    workdir = base / "work"  # used only where there is no private /tmp to put it in
    os.chmod(base, 0o711)  # the program may pass through to its working directory, not list it
    spec = {"files": files, "argv": argv, "workdir": str(workdir), "uid": uid, "gid": gid, "probe": probe,
            "limits": asdict(limits), "hidden": _home_directories(), "exposed": _python_installation()}
    spec_path = base / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    os.chmod(spec_path, 0o600)
    started = time.monotonic()
    # Output goes to unlinked files, not pipes: the program's RLIMIT_FSIZE caps them, so a
    # flood costs neither the trainer's memory nor a reader thread.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(stdin.encode())
        inp.seek(0)
        try:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", str(CHILD), str(spec_path)], stdin=inp, stdout=out, stderr=err,
                cwd=base, env={}, start_new_session=True, close_fds=True)
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox: {e}") from e
        timed_out = False
        try:
            child.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            # The launcher answers SIGTERM by killing the program and reaping it: killed from
            # here instead, the program would be left a zombie that still counts against its
            # uid's process limit.
            child.terminate()
            try:
                child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        finally:
            _kill_group(child.pid)
            child.wait()
            # Killing by uid only for a uid of our own: nobody's processes are not ours to kill.
            _reap(child.pid, uid if os.getuid() == 0 and uid != FALLBACK_UID else None)
        return SandboxResult(returncode=child.returncode, stdout=_read(out, limits.output_bytes),
                             stderr=_read(err, limits.output_bytes), timed_out=timed_out,
                             wall_seconds=time.monotonic() - started)


def _home_directories() -> list[str]:
    """Directories the program must not see: homes hold tokens, keys and caches."""
    return sorted({"/root", "/home", str(Path.home())})


@functools.cache
def _python_installation() -> list[str]:
    """What the program's interpreter needs to see, even where it lives in a hidden home
    (pyenv, a virtualenv in a project folder)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(os.path.realpath(p) for p in paths)


def _sandbox_uid(slot: int) -> int:
    return SANDBOX_UID_BASE + slot if _large_uids_usable() else FALLBACK_UID


@functools.cache
def _large_uids_usable() -> bool:
    """False inside a user namespace that maps only a small uid range (rootless containers)."""
    try:
        with open("/proc/self/uid_map") as f:
            return any(int(inner) <= SANDBOX_UID_BASE + 4096 < int(inner) + int(count)
                       for inner, _, count in (line.split() for line in f))
    except OSError:
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pgid: int, uid: int | None, patience: float = 5.0) -> None:
    """Kill and wait out what is left of the run: its process group, and (as root) anything
    running as its uid, e.g. a process that left the group with setsid where there is no PID
    namespace to take it down. Killed processes take a moment to disappear; the call returns
    when they have, so none outlives it."""
    deadline = time.monotonic() + patience
    while True:
        left = _leftovers(pgid, uid)
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _leftovers(pgid: int, uid: int | None) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            # fields[0] is the state, [2] the process group; a zombie (Z) is dead already, and
            # the parent that reaps it is not ours to wait for.
            if fields[0] == b"Z":
                continue
            if int(fields[2]) == pgid or (uid is not None and os.stat(f"/proc/{pid}").st_uid == uid):
                found.append(int(pid))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return found


def _read(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


@functools.cache
def isolation_report() -> dict[str, bool]:
    """What confinement holds on this machine, as the child reports it (cached: one probe)."""
    slot = _slots.acquire()
    base = Path(tempfile.mkdtemp(prefix="lowvram-sandbox-"))
    try:
        result = _run({}, [], "", SandboxLimits(), slot, base, probe=True)
    finally:
        _slots.release(slot)
        shutil.rmtree(base, ignore_errors=True)
    if result.returncode != 0:
        raise SandboxError(f"the sandbox cannot start here: {result.stderr.strip() or result.returncode}")
    return json.loads(result.stdout)


def describe_isolation(report: dict[str, bool]) -> str:
    """One line for the log: what holds, and what does not."""
    missing = [name.replace("_", " ") for name, ok in report.items()
               if not ok and name not in ("user_namespace", "unprivileged_uid")]
    who = "an unprivileged uid" if report.get("unprivileged_uid") else "your uid"
    if not missing:
        return f"code sandbox: no network, read-only files, private /tmp and /proc, runs as {who}"
    return (f"code sandbox: resource limits and an empty environment hold; NOT available here: "
            f"{', '.join(missing)} (see the README's code execution section)")


def run_many(jobs: list[dict], workers: int | None = None) -> list[SandboxResult]:
    """`run_program(**job)` for every job, `workers` at once (default: the cores)."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers or default_workers(), len(jobs))) as pool:
        return list(pool.map(lambda job: run_program(**job), jobs))
