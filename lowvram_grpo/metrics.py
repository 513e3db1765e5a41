"""The run directory's live files: status.json, metrics.jsonl, completions.jsonl.

These files are the contract between the engine and its front ends (the CLI's progress bar,
the Gradio app, the notebook): the app never talks to the trainer process, it reads these.
So every write is either an atomic replace (status.json) or a flushed whole-line append
(the .jsonl files), and a reader never sees half a record.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

STATES = ("running", "stopping", "stopped", "finished", "failed")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def write_status(run_dir: Path, state: str, step: int, total_steps: int,
                 error: str | None = None, **extra: Any) -> None:
    assert state in STATES, state
    status = {"state": state, "step": step, "total_steps": total_steps, "pid": os.getpid(),
              "error": error, "updated": time.time(), **extra}
    write_json_atomic(run_dir / "status.json", status)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
    """All complete records; a torn last line (the writer was killed mid-write) is skipped.

    Lines are split on "\n" only: str.splitlines() also splits on U+2028, U+2029, U+0085 and
    other separators that a completion may hold raw, and would lose that record."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return records
    for line in text.split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_jsonl_after_step(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they will be redone, and the
    curves must not show them twice."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(jsonl_line(r) for r in kept), encoding="utf-8")
        os.replace(tmp, path)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / (2**30 if sys.platform == "darwin" else 2**20)


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
