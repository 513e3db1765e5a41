"""Training jobs for the web app: start the CLI trainer as a subprocess, stop it, find it again.

The app never trains in its own process (a crash or an out-of-memory kill in training must not
take the page down). It runs

    python -m lowvram_grpo train --config RUN_DIR/config.yaml --no-progress
    python -m lowvram_grpo train --resume RUN_DIR --no-progress

with stdout and stderr going to RUN_DIR/train.log, and from then on only reads the run
directory (status.json, metrics.jsonl, completions.jsonl, checkpoints). Stop sends SIGTERM (CTRL_BREAK on Windows): the
trainer saves a checkpoint of its last finished step and exits with state "stopped" (within
seconds, even in the middle of generation or of a reward call). Should it not, Stop pressed
again after FORCE_STOP_AFTER seconds kills it, and the run is marked stopped at its last
checkpoint.

One job at a time per work directory. `WORK_DIR/job.json` records the current job (pid, run
directory, command), so a reloaded page, or the app started again, finds a training that is
still running and shows it instead of starting a second one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lowvram_grpo.config import TrainConfig
from lowvram_grpo.processes import ask_to_stop, kill_group, own_group_options, pid_alive
from lowvram_grpo.rundir import RunDir, read_status, write_json_atomic

LOG_NAME = "train.log"
REGISTRY_NAME = "job.json"
# status.json states in which the trainer process is still at work.
ACTIVE_STATES = ("running", "stopping")
# Seconds after a Stop before a second Stop may kill the trainer: a checkpoint being written
# must not be cut short by an impatient second click.
FORCE_STOP_AFTER = 20.0


class JobError(RuntimeError):
    """A job cannot be started, resumed or stopped; the message says why, for the page."""


@dataclass
class Job:
    pid: int
    run_dir: str
    command: list[str]
    started: float = field(default_factory=time.time)
    stop_requested: float | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir) / LOG_NAME


def _is_trainer(pid: int) -> bool:
    """Guard against pid reuse: on Linux, check the process is a lowvram_grpo trainer."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the pid
    return b"lowvram_grpo" in cmdline and b"train" in cmdline


class JobManager:
    """Starts, stops and finds the one training job of a work directory."""

    def __init__(self, work_dir: str | Path):
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.registry = self.work_dir / REGISTRY_NAME
        self._lock = threading.Lock()  # two clicks on Start must not both get through
        self._children: dict[int, subprocess.Popen] = {}

    # --- the registry --------------------------------------------------------------------------

    def current(self) -> Job | None:
        """The last job started from this work directory (alive or not)."""
        try:
            return Job(**json.loads(self.registry.read_text(encoding="utf-8")))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def _save(self, job: Job) -> None:
        write_json_atomic(self.registry, asdict(job))

    def is_alive(self, job: Job) -> bool:
        child = self._children.get(job.pid)
        if child is not None:  # our own child: poll() also reaps it once it has exited
            return child.poll() is None
        return pid_alive(job.pid) and _is_trainer(job.pid)

    def running(self) -> Job | None:
        """The job whose trainer process is still alive, if any."""
        job = self.current()
        return job if job is not None and self.is_alive(job) else None

    # --- start / resume / stop -----------------------------------------------------------------

    def start(self, config: TrainConfig) -> Job:
        """Write the resolved config into its run directory and train it in a subprocess."""
        run = RunDir(config.output_dir)
        with self._lock:
            self._refuse_if_running()
            if run.holds_a_run():
                raise JobError(f"run '{run.name}' already exists: resume it, or choose another run name")
            run.path.mkdir(parents=True, exist_ok=True)
            run.save_config(config)
            return self._launch(["train", "--config", str(run.config_file), "--no-progress"], run.path)

    def resume(self, run_dir: str | Path) -> Job:
        """Continue a stopped (or crashed) run from its newest checkpoint."""
        run = RunDir(run_dir)
        with self._lock:
            self._refuse_if_running()
            if not run.config_file.is_file():
                raise JobError(f"{run.name} is not a run directory (no config.yaml)")
            if (run.status() or {}).get("state") == "finished":
                raise JobError(f"run '{run.name}' finished all its steps; continue it for more steps, or start a "
                               "new run")
            if run.latest_checkpoint() is None:
                raise JobError(f"run '{run.name}' has no checkpoint to resume from; start it again instead")
            return self._launch(["train", "--resume", str(run.path), "--no-progress"], run.path)

    def continue_run(self, run_dir: str | Path, extra_steps: int) -> Job:
        """Train a finished run `extra_steps` steps further, from its last checkpoint: its
        config.yaml gets the new max_steps (so a later resume keeps it), then it resumes."""
        run = RunDir(run_dir)
        if extra_steps < 1:
            raise JobError("more steps: give how many steps to add (at least 1)")
        with self._lock:
            self._refuse_if_running()
            if (run.status() or {}).get("state") != "finished":
                raise JobError(f"run '{run.name}' has not finished; Resume it instead")
            if run.latest_checkpoint() is None:
                raise JobError(f"run '{run.name}' kept no checkpoint to continue from; start a new run")
            config = run.read_config()
            run.save_config(replace(config, max_steps=config.max_steps + extra_steps))
            return self._launch(["train", "--resume", str(run.path), "--no-progress"], run.path)

    def stop(self) -> str:
        """Ask the running trainer to stop (SIGTERM): it saves a checkpoint, then exits. Asked
        again, FORCE_STOP_AFTER seconds or more later, kill it (see `kill`)."""
        job = self.running()
        if job is None:
            raise JobError("no training is running")
        if job.stop_requested:
            waited = time.time() - job.stop_requested
            if waited < FORCE_STOP_AFTER:  # a second SIGTERM could cut the checkpoint being saved short
                return (f"Stop already requested: the trainer is saving a checkpoint. Press Stop again after "
                        f"{FORCE_STOP_AFTER - waited:.0f} s to end it at once.")
            self.kill(job, f"killed by a second Stop, {waited:.0f} s after the first went unanswered")
            return (f"The trainer did not stop within {waited:.0f} s: ended it. Resume continues from its last "
                    "checkpoint.")
        ask_to_stop(job.pid)
        job.stop_requested = time.time()
        self._save(job)
        return (f"Stop requested for run '{Path(job.run_dir).name}': the trainer finishes its step, "
                "saves a checkpoint and exits.")

    def kill_and_wait(self, timeout: float = 30.0) -> None:
        """Stop the running job and wait for it to exit (SIGKILL after `timeout`). For tests
        and shutdown hooks; the page's Stop button only asks."""
        job = self.running()
        if job is None:
            return
        if not job.stop_requested:
            ask_to_stop(job.pid)
        deadline = time.time() + timeout
        while self.is_alive(job) and time.time() < deadline:
            time.sleep(0.2)
        if self.is_alive(job):
            self.kill(job, f"killed: it did not stop within {timeout:g} s")

    def kill(self, job: Job, why: str) -> None:
        """SIGKILL the job's whole process group (it leads its own session, so data-parallel
        workers it launched go too), and say so in status.json: a killed trainer cannot, and
        the file would say "running" for ever."""
        kill_group(job.pid)
        child = self._children.get(job.pid)
        if child is not None:
            child.wait(10)
        run = RunDir(job.run_dir)
        status = run.status() or {}
        if status.get("state") in ACTIVE_STATES or not status:
            latest = run.latest_checkpoint()
            note = f"{why}; resume continues from {latest.name}" if latest else f"{why}; no checkpoint yet"
            run.write_status("stopped", status.get("step", 0), status.get("total_steps", 0), note=note,
                             pid=status.get("pid", job.pid))

    @staticmethod
    def trainer_command(args: list[str]) -> list[str]:
        return [sys.executable, "-m", "lowvram_grpo", *args]

    def _refuse_if_running(self) -> None:
        job = self.running()
        if job is not None:
            raise JobError(f"a training is already running (run '{Path(job.run_dir).name}', pid {job.pid}); "
                           "stop it first")

    def _launch(self, args: list[str], run_dir: Path) -> Job:
        command = self.trainer_command(args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (run_dir / LOG_NAME).open("ab") as log:
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            # Own session: Ctrl-C in the app's terminal does not interrupt the training, and the
            # page can reattach to it after the app restarts. Never shell=True.
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, **own_group_options())
        self._children[child.pid] = child
        job = Job(pid=child.pid, run_dir=str(run_dir.resolve()), command=command)
        self._save(job)
        return job


def run_state(run_dir: str | Path, manager: JobManager | None = None) -> dict:
    """status.json of a run, completed with what the files alone cannot say: "starting" (the
    trainer is loading, no status yet), and "died" (status says running, the process is gone)."""
    run_dir = Path(run_dir)
    status = dict(read_status(run_dir) or {})
    job = manager.current() if manager else None
    ours = job is not None and Path(job.run_dir) == run_dir.resolve()
    pid = status.get("pid")
    alive = manager.is_alive(job) if ours else bool(pid) and pid_alive(pid) and _is_trainer(pid)
    if not status:
        if ours and alive:
            status["state"] = "starting"
        elif ours and job.stop_requested:  # stopped while Python was still importing
            status.update(state="stopped", error=None, note="stopped before training began")
        elif ours:
            status.update(state="failed", error="the trainer exited before it started training; see the log")
        else:
            status["state"] = "empty"
    elif status.get("state") in ACTIVE_STATES and not alive and (ours or status.get("pid")):
        # Killed (SIGKILL, out of memory, power): the newest checkpoint is intact.
        status.update(state="died", error="the trainer process is gone (killed, or out of memory?); "
                                          "Resume continues from the newest checkpoint")
    if ours and alive and job.stop_requested and status.get("state") == "running":
        status["state"] = "stopping"
    status["alive"] = alive
    return status


def tail(path: str | Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a log, with progress-bar redraws (carriage returns) collapsed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    shown = [line.rsplit("\r", 1)[-1] for line in data.splitlines()]
    return "\n".join(shown[-lines:])
