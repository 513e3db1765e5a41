"""The run directory: the contract between the engine and its front ends.

    <output_dir>/
      config.yaml          the configuration as the user gave it ("auto" stays "auto")
      status.json          {"state", "step", "total_steps", "pid", "error", ...}
      metrics.jsonl        one JSON object per step
      completions.jsonl    sampled prompts, completions and rewards every N steps
      checkpoint-000050/   adapter + resume state (see checkpoint.py)
      final/               the finished adapter (PEFT format)

The trainer writes it; the CLI, the app, its job manager and the notebook only read it (the
app never talks to the trainer process). So every write is an atomic replace (status.json,
checkpoints) or a flushed whole-line append (the .jsonl files), and a reader never sees half
a record. Everything that knows a file name or what a file means lives here.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("running", "stopping", "stopped", "finished", "failed")
FINAL = "final"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"  # in each checkpoint: what checkpoint.py saves to resume exactly


# --- checkpoint directories (checkpoint.py writes and reads what is inside) ------------------------


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


# --- files: atomic JSON, whole-line JSONL ---------------------------------------------------------


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def jsonl_line(record: dict[str, Any]) -> str:
    """One record as one line of JSON. Non-finite floats, at any depth, become null (JSON has
    no NaN); text stays readable (ensure_ascii=False): json.dumps escapes every control
    character, so the only newline in the line is the one that ends it."""
    return json.dumps(_finite(record), ensure_ascii=False) + "\n"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(jsonl_line(record))
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line (the writer was killed mid-write) is skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _records(data)


def _records(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of the lines in `data`; a line that is not one (torn) is skipped.

    Lines are split on "\\n" only: str.splitlines() also splits on U+2028, U+2029, U+0085 and
    other separators that a completion may hold raw, and would lose that record. (Splitting the
    bytes is safe: no byte of a multi-byte UTF-8 character is "\\n".)"""
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class JsonlFollower:
    """The records of a .jsonl file that a run is appending to, read a piece at a time.

    Each `update()` reads only the bytes added since the last one and takes only whole,
    "\\n"-terminated lines: a torn last line (the writer is mid-write, or was killed) stays for
    the next read. A file that was rewritten is read again from the start, and `generation`
    counts those restarts, so a reader knows earlier records changed, not only that new ones
    came. Rewritten means: gone, a different file (a resumed run's truncate_jsonl_after_step
    replaces it; a deleted run recreated), shorter than what was read, or no longer holding the
    last line read where it was read (a rewrite in place that grew past it).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.generation = 0
        self._offset = 0  # bytes of whole lines read so far
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file read
        self._last_line = b""  # the last whole line read, ending at _offset

    def update(self) -> list[dict[str, Any]]:
        """Read what was appended since the last call; returns the new records (all of them
        after a restart: see `generation`)."""
        data = self._unread()
        end = data.rfind(b"\n") + 1  # whole lines only (0: none yet)
        if not end:
            return []
        whole = data[:end]
        new = _records(whole)
        self.records.extend(new)
        self._offset += end
        self._last_line = whole[whole.rfind(b"\n", 0, end - 1) + 1:]
        return new

    def _unread(self) -> bytes:
        """The bytes after those read so far; first a restart if the file was rewritten."""
        try:
            with self.path.open("rb") as f:
                info = os.fstat(f.fileno())
                file_id = (info.st_dev, info.st_ino)
                if file_id != self._file_id or info.st_size < self._offset:
                    self._restart(file_id)
                f.seek(self._offset - len(self._last_line))  # re-read the last line: is it still there?
                data = f.read()
                if not data.startswith(self._last_line):
                    self._restart(file_id)
                    f.seek(0)
                    data = f.read()
                return data[len(self._last_line):]
        except FileNotFoundError:
            if self._file_id is not None:
                self._restart(None)
            return b""

    def _restart(self, file_id: tuple[int, int] | None) -> None:
        if self._file_id is not None or self._offset:
            self.generation += 1
        self.records, self._offset, self._last_line, self._file_id = [], 0, b"", file_id


def truncate_jsonl_after_step(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they will be redone, and the
    curves must not show them twice."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(jsonl_line(r) for r in kept), encoding="utf-8")
        os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float, however deeply nested, replaced by None: JSON has
    no NaN/Infinity, and null keeps the file readable by every JSON parser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --- status --------------------------------------------------------------------------------------


def write_status(run_dir: str | Path, state: str, step: int, total_steps: int,
                 error: str | None = None, **extra: Any) -> None:
    assert state in STATES, state
    status = {"state": state, "step": step, "total_steps": total_steps, "pid": os.getpid(),
              "error": error, "updated": time.time(), **extra}
    write_json_atomic(Path(run_dir) / "status.json", status)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- the directory as a whole ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """One run's directory: where each file is and what it says."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def completions_file(self) -> Path:
        return self.path / "completions.jsonl"

    @property
    def final_adapter(self) -> Path:
        return self.path / FINAL

    def holds_a_run(self) -> bool:
        """Whether a run has trained here: a new run must not mix its curves into this one's
        metrics.jsonl, nor overwrite its checkpoints. (A run that failed before its first
        step leaves only config.yaml and status.json: starting again there loses nothing.)"""
        return self.metrics_file.exists() or self.final_adapter.exists() or bool(self.checkpoints())

    def read_config(self, overrides: dict[str, Any] | None = None, key: str = "--resume"):
        """The run's config.yaml (with `overrides` on top), or a ConfigError naming `key`."""
        from lowvram_grpo.config import ConfigError, build_config, read_yaml

        if not self.config_file.is_file():
            raise ConfigError(f"{key}: {self.path} has no config.yaml; is it a lowvram-grpo run directory?")
        return build_config({**read_yaml(self.config_file), **(overrides or {})})

    def save_config(self, config) -> None:
        from lowvram_grpo.config import save_config

        save_config(config, self.config_file)

    def status(self) -> dict[str, Any] | None:
        return read_status(self.path)

    def write_status(self, state: str, step: int, total_steps: int, error: str | None = None, **extra: Any) -> None:
        write_status(self.path, state, step, total_steps, error, **extra)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_file)

    def completions(self) -> list[dict[str, Any]]:
        return read_jsonl(self.completions_file)

    def append_step(self, record: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        append_jsonl(self.metrics_file, record)
        for sample in samples:
            append_jsonl(self.completions_file, sample)

    def truncate_after(self, step: int) -> None:
        """Forget the records of steps after `step` (a resumed run redoes them)."""
        truncate_jsonl_after_step(self.metrics_file, step)
        truncate_jsonl_after_step(self.completions_file, step)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return checkpoint_dirs(self.path)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def adapters(self) -> list[Path]:
        """Every adapter a user can load: the checkpoints, oldest first, then final/."""
        final = [self.final_adapter] if (self.final_adapter / "adapter_config.json").is_file() else []
        return self.checkpoints() + final

    def newest_adapter(self) -> Path | None:
        """final/ when the run finished, else its newest checkpoint (None if it has neither)."""
        found = self.adapters()
        return found[-1] if found else None


@dataclass(frozen=True)
class TrainResult:
    """How `train()` ended: "finished" (adapter = final/) or "stopped" (adapter = the newest
    checkpoint, None when it stopped before the first one)."""

    run_dir: RunDir
    state: str
    step: int
    adapter: Path | None

    @property
    def finished(self) -> bool:
        return self.state == "finished"
