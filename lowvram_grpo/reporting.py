"""Optional logging integrations: TensorBoard, Weights & Biases, Trackio (`report_to`).

The run directory's metrics.jsonl is the record of a run and is written whatever happens; these
integrations only mirror it to a dashboard. Each one is opt-in (`report_to: [wandb]`) and its
package is never required otherwise. If a requested package is missing, `make_reporters`
raises `ReporterUnavailableError` at the start of the run, with the pip command in its one-line
message: a run that silently logs nowhere would only be noticed hours later.

    reporters = make_reporters(config.report_to, run_dir, config.to_dict())
    reporters.log(record, step)                    # every step
    reporters.log_completions(records, step)       # sampled completions, as a table
    reporters.close()                              # at the end (also: `with reporters:`)

Where each one writes:
    tensorboard  <run_dir>/tensorboard/ (view: `tensorboard --logdir <run_dir>`)
    wandb        project `lowvram-grpo` (or $WANDB_PROJECT), run named after the run directory;
                 its local files go under <run_dir>/wandb/. A resumed run continues the same
                 wandb run (its id is kept in <run_dir>/wandb_run_id.txt).
    trackio      project `lowvram-grpo` (or $TRACKIO_PROJECT), run named after the run directory
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lowvram_grpo.config import ConfigError

logger = logging.getLogger(__name__)
PROJECT = "lowvram-grpo"
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb",
           "trackio": "pip install trackio"}


class ReporterUnavailableError(ConfigError, ImportError):
    """A `report_to` integration whose package is not installed; the message has the pip command.

    A ConfigError, so the CLI prints it as one line, and an ImportError, because that is what it is.
    """


def _missing(name: str, err: ImportError) -> ReporterUnavailableError:
    return ReporterUnavailableError(
        f"report_to: {name} is not installed ({err}); install it with `{INSTALL[name]}` or remove "
        f"'{name}' from report_to")


class TensorBoardReporter:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config_dict: dict[str, Any]):
        try:  # torch ships the writer, but it needs the tensorboard package
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise _missing(self.name, err) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config_dict, indent=1, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        # The default flush interval is two minutes; a live dashboard should see each step.
        self.writer.flush()

    def log_completions(self, records: list[dict], step: int) -> None:
        columns, rows = completion_table(records)
        header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(_markdown_cell(v) for v in row) + " |\n" for row in rows)
        self.writer.add_text("completions", header + body, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    name = "wandb"

    def __init__(self, run_dir: Path, config_dict: dict[str, Any]):
        try:
            import wandb
        except ImportError as err:
            raise _missing(self.name, err) from None
        self.wandb = wandb
        id_file = run_dir / "wandb_run_id.txt"
        # Resuming a run directory continues its wandb run instead of starting a second one.
        resume_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                              config=config_dict, dir=str(run_dir),
                              **({"id": resume_id, "resume": "allow"} if resume_id else {}))
        if not resume_id and getattr(self.run, "id", None):
            id_file.write_text(str(self.run.id), encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_completions(self, records: list[dict], step: int) -> None:
        columns, rows = completion_table(records)
        self.run.log({"completions": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioReporter:
    name = "trackio"

    def __init__(self, run_dir: Path, config_dict: dict[str, Any]):
        try:
            import trackio
        except ImportError as err:
            raise _missing(self.name, err) from None
        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_dir.name,
                                config=config_dict)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def log_completions(self, records: list[dict], step: int) -> None:
        if not hasattr(self.trackio, "Table"):  # older trackio versions log scalars only
            return
        columns, rows = completion_table(records)
        self.trackio.log({"completions": self.trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.trackio.finish()


BACKENDS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "trackio": TrackioReporter}


class Reporters:
    """The integrations of one run, called together; with none configured every call is a no-op.

    A dashboard failing mid-run (network down, service error) prints one warning and that
    integration is switched off: hours of training are not lost to a logging hiccup, and
    metrics.jsonl still has everything.
    """

    def __init__(self, backends: list | None = None):
        self.backends = list(backends or [])

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Numeric metrics of one step (`step` itself, None, NaN and text values are left out)."""
        scalars = numeric_metrics(metrics)
        self._each("log", scalars, step)

    def log_completions(self, records: list[dict], step: int) -> None:
        """Sampled completions (the records of completions.jsonl) as a table."""
        if records:
            self._each("log_completions", records, step)

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except Exception as err:  # closing is best effort; the run itself is finished
                logger.warning(f"closing {backend.name} failed: {err}")
        self.backends = []

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as err:
                logger.warning(f"{backend.name} logging failed ({type(err).__name__}: {err}); {backend.name} is "
                               "off for the rest of this run (metrics.jsonl still has everything)")
                self.backends.remove(backend)


def make_reporters(report_to: list[str], run_dir: str | Path, config_dict: dict[str, Any]) -> Reporters:
    """Start every integration named in `report_to` (duplicates ignored).

    Raises ReporterUnavailableError (one line, with the pip command) if a package is missing,
    and ConfigError for an unknown name. Nothing is left half-started: if one integration fails,
    those already started are closed again.
    """
    run_dir = Path(run_dir)
    names = list(dict.fromkeys(report_to or []))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"report_to: unknown integration(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(BACKENDS)}")
    if names:
        run_dir.mkdir(parents=True, exist_ok=True)
    started: list = []
    try:
        for name in names:
            started.append(BACKENDS[name](run_dir, config_dict))
    except BaseException:
        Reporters(started).close()
        raise
    return Reporters(started)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, without `step` (every backend gets it separately)."""
    out = {}
    for key, value in metrics.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def completion_table(records: list[dict]) -> tuple[list[str], list[list]]:
    """Columns and rows for completion records; nested `rewards` become `rewards/<name>` columns,
    and conversations or other structures become JSON text."""
    flat = []
    for record in records:
        row = {k: v for k, v in record.items() if k != "rewards"}
        for name, value in (record.get("rewards") or {}).items():
            row[f"rewards/{name}"] = value
        flat.append(row)
    columns = list(dict.fromkeys(key for row in flat for key in row))
    rows = [[_cell(row.get(c)) for c in columns] for row in flat]
    return columns, rows


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, ensure_ascii=False)


def _markdown_cell(value: Any) -> str:
    text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    return text.replace("|", "\\|").replace("\n", "<br>")
