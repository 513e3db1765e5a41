"""What the app shows about runs, computed without gradio: curve data, status text, the runs
table, the completions browser, checkpoints, adapters.

Curves are drawn in the browser (ui_curves.js) from a store that the page keeps per run. Each
refresh sends only the metric rows the page does not have yet (`curve_delta`), so the update
size does not grow with the number of steps; a run the page has not seen is sent whole once.
The server side of a refresh reads only the lines added to the run's files since the last one
(`LiveRuns`), so its time does not grow with the number of steps either.
"""

from __future__ import annotations

import html
import json
import os
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram_grpo.rewards.base import completion_text
from lowvram_grpo.rundir import JsonlFollower, RunDir
from lowvram_grpo.vision import thumbnails_markdown

# The curves, in page order. "series" are metric keys; "prefix"/"suffix" pick every matching
# key (one line per reward function); "band" is the key of a ±band around the first series.
CURVES: list[dict[str, Any]] = [
    {"id": "reward", "title": "Reward (mean ± std)", "series": ["reward"], "band": "reward_std"},
    {"id": "reward-functions", "title": "Reward per function", "prefix": "rewards/", "suffix": "/mean"},
    {"id": "zero-std", "title": "Groups with zero reward std (no learning signal)",
     "series": ["frac_reward_zero_std"]},
    {"id": "kl", "title": "KL to the base model", "series": ["kl"]},
    {"id": "loss", "title": "Loss", "series": ["loss"]},
    {"id": "entropy", "title": "Entropy", "series": ["entropy"]},
    {"id": "entropy-coef", "title": "Entropy bonus coefficient", "series": ["entropy_coef"]},
    {"id": "grad-norm", "title": "Gradient norm", "series": ["grad_norm"]},
    {"id": "learning-rate", "title": "Learning rate", "series": ["learning_rate"]},
    {"id": "clip", "title": "Clip ratios",
     "series": ["clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"]},
    {"id": "length", "title": "Completion length (tokens)",
     "series": ["completions/mean_length", "completions/min_length", "completions/max_length"]},
    {"id": "tokens-per-second", "title": "Tokens per second", "series": ["tokens_per_second"]},
    {"id": "memory", "title": "Peak memory (GB)", "series": ["peak_memory_gb"]},
    {"id": "eval", "title": "Eval (held-out prompts)", "prefix": "eval/", "suffix": ""},
    {"id": "tools", "title": "Tool use per trajectory (calls, failure rate, turns)", "prefix": "tools/", "suffix": ""},
]
SIGNIFICANT_DIGITS = 6  # what the page needs to draw and show on hover; keeps updates small


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _compact(value: Any) -> float | None:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if _is_number(value) else None


def curve_columns(records: list[dict]) -> tuple[list[str], list[list[float | None]]]:
    """Metric rows as (keys, rows of values): numbers only, `step` first."""
    keys = ["step"] + sorted({k for r in records for k, v in r.items() if k != "step" and _is_number(v)})
    return keys, [[_compact(r.get(k)) for k in keys] for r in records]


def curve_delta(runs: dict[str, RunRecords], sent: dict[str, tuple[int, int]],
                seq: int) -> tuple[dict | None, dict[str, tuple[int, int]]]:
    """The update for the page's curve store: for each run, the rows after those the page
    already has. `sent[run]` is (generation, rows) of what the page has: a run it has not seen,
    or whose metrics.jsonl was rewritten since (a resumed run redoes steps), is sent whole.
    Returns (None, sent) when nothing changed. `seq` makes every update distinct, so the page
    applies each once."""
    parts, now = {}, {}
    for name, run in runs.items():
        had = tuple(sent[name]) if name in sent else None
        now[name] = (run.generation, len(run.metrics))
        if now[name] != had:
            start = had[1] if had and had[0] == run.generation else 0
            keys, rows = curve_columns(run.metrics[start:])
            parts[name] = {"start": start, "keys": keys, "rows": rows}
    if not parts and list(now) == list(sent):
        return None, sent
    delta = {"seq": seq, "selected": list(runs), "runs": parts}
    if not sent:  # a page's first update: what to draw (later ones need only the new rows)
        delta["curves"] = CURVES
    return delta, now


def delta_json(delta: dict) -> str:
    return json.dumps(delta, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class RunRecords:
    """What a refresh knows of a run's files: its metric rows and logged completions, and the
    generation of its metrics.jsonl (see rundir.JsonlFollower)."""

    generation: int
    metrics: list[dict]
    samples: list[dict]


class LiveRuns:
    """The metrics and completions of the runs that pages watch, read incrementally: a refresh
    parses only the lines added since the previous one (rundir.JsonlFollower).

    One per app, shared by every open page, rather than one per page session: two tabs do not
    parse a file twice, and two refreshes of one page (the timer and a selection change run
    concurrently) cannot interleave reads of one file. Each page's state says only which rows it
    has (`curve_delta`). The KEEP runs watched most recently are kept in memory.
    """

    KEEP = 8

    def __init__(self):
        self._followers: OrderedDict[Path, tuple[JsonlFollower, JsonlFollower]] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, run_dir: Path, samples: bool = False) -> RunRecords:
        """The run's records now (its completions too with `samples`), as copies a refresh can
        use while the next one reads on."""
        with self._lock:
            pair = self._followers.pop(run_dir, None) or (
                JsonlFollower(RunDir(run_dir).metrics_file), JsonlFollower(RunDir(run_dir).completions_file))
            self._followers[run_dir] = pair  # now the most recently watched
            while len(self._followers) > self.KEEP:
                self._followers.popitem(last=False)
            metrics, completions = pair
            metrics.update()
            if samples:
                completions.update()
            return RunRecords(metrics.generation, list(metrics.records),
                              list(completions.records) if samples else [])


# --- status ------------------------------------------------------------------------------------

ACTIVE = ("starting", "running", "stopping")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def status_html(run_name: str, status: dict, records: list[dict]) -> str:
    """One line of state, progress, ETA and memory, with a progress bar; the error if failed."""
    state = status.get("state", "empty")
    run_name = escape(run_name)
    if state == "empty":
        return f"<div class='run-status'><b>{run_name}</b>: no status yet</div>"
    step = int(status.get("step") or (records[-1]["step"] if records else 0))
    total = int(status.get("total_steps") or 0)
    parts = [f"<b>{state}</b>", f"run <code>{run_name}</code>"]
    if status.get("note"):
        parts.append(escape(status["note"]))
    if state == "starting" or (state == "running" and not records):
        parts.append("loading the model and the data")
    if total:
        parts.append(f"step {step} / {total}")
    times = [r["step_time"] for r in records[-20:] if isinstance(r.get("step_time"), (int, float))]
    if times and state in ("running", "starting") and total:
        per_step = sum(times) / len(times)
        parts.append(f"{per_step:.2f} s/step, ETA {_duration(per_step * max(total - step, 0))}")
    peaks = [r["peak_memory_gb"] for r in records if isinstance(r.get("peak_memory_gb"), (int, float))]
    if peaks:
        parts.append(f"peak memory {max(peaks):.2f} GB")
    if records and isinstance(records[-1].get("reward"), (int, float)):
        parts.append(f"reward {records[-1]['reward']:.3f}")
    out = f"<div class='run-status state-{state}'>{' · '.join(parts)}"
    if total:
        out += f"<br><progress value='{step}' max='{total}' style='width:100%'></progress>"
    if status.get("error"):
        out += f"<pre class='run-error'>{escape(status['error'])}</pre>"
    return out + "</div>"


@dataclass(frozen=True)
class Buttons:
    """Which run actions make sense in a state (the page enables only these)."""

    stop: bool
    resume: bool
    more_steps: bool


def buttons_for(state: str, has_checkpoint: bool, job_running: bool) -> Buttons:
    """Stop only while the run trains; Resume only for a run that ended early with a checkpoint;
    "continue for N more steps" only for a finished run."""
    active = state in ACTIVE
    ended_early = state in ("stopped", "died", "failed") and has_checkpoint
    return Buttons(stop=active, resume=ended_early and not job_running,
                   more_steps=state == "finished" and not job_running)


# --- runs --------------------------------------------------------------------------------------

RUN_TABLE_COLUMNS = ["run", "state", "model", "dataset", "steps", "last reward", "best reward", "started"]


def list_runs(runs_dir: Path) -> list[str]:
    """Run directories (those with a config.yaml), newest first."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and RunDir(p).config_file.is_file()]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def run_row(run_dir: Path, status: dict, records: list[dict]) -> list[Any]:
    """One line of the runs table."""
    import yaml

    try:
        config = yaml.safe_load(RunDir(run_dir).config_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    rewards = [r["reward"] for r in records if isinstance(r.get("reward"), (int, float))]
    step = status.get("step") or (records[-1].get("step") if records else 0)
    total = status.get("total_steps") or config.get("max_steps") or "?"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(RunDir(run_dir).config_file.stat().st_ctime))
    return [run_dir.name, status.get("state", "empty"), str(config.get("model_name_or_path", "?")),
            str(config.get("dataset", "?")), f"{step} / {total}",
            round(rewards[-1], 4) if rewards else None, round(max(rewards), 4) if rewards else None, started]


# --- completions browser -----------------------------------------------------------------------

COMPLETION_COLUMNS = ["step", "reward", "advantage", "rewards", "prompt", "completion", "image"]
# How the browser's table shows each column: the prompt's images as thumbnails (markdown images).
COMPLETION_DATATYPES = ["number", "number", "number", "str", "str", "str", "markdown"]


def _shown(prompt: Any) -> str:
    return completion_text(prompt) if isinstance(prompt, (str, list)) else str(prompt or "")


def completion_functions(samples: list[dict]) -> list[str]:
    return sorted({name for s in samples for name in (s.get("rewards") or {})})


def filter_completions(samples: list[dict], step_from: float | None = None, step_to: float | None = None,
                       min_reward: float | None = None, function: str = "", text: str = "",
                       limit: int = 200) -> list[list[Any]]:
    """Logged completions, newest first, filtered by step range, reward and text. With a
    `function`, `min_reward` applies to that function's reward and rows without it are left out."""
    rows = []
    for s in matching_completions(samples, step_from, step_to, min_reward, function, text, limit):
        per_function = s.get("rewards") or {}
        rewards = ", ".join(f"{k} {v:.3g}" for k, v in per_function.items() if isinstance(v, (int, float)))
        rows.append([s.get("step") or 0, round(float(s.get("reward") or 0.0), 4),
                     round(float(s.get("advantage") or 0.0), 4), rewards, _shown(s.get("prompt")),
                     str(s.get("completion")), thumbnails_markdown(s.get("images") or [])])
    return rows


def matching_completions(samples: list[dict], step_from: float | None = None, step_to: float | None = None,
                         min_reward: float | None = None, function: str = "", text: str = "",
                         limit: int = 200) -> list[dict]:
    """The logged samples filter_completions shows, newest first."""
    found = []
    for s in reversed(samples):
        step = s.get("step") or 0
        if step_from is not None and step < step_from or step_to is not None and step > step_to:
            continue
        per_function = s.get("rewards") or {}
        if function and function not in per_function:
            continue
        value = per_function.get(function) if function else s.get("reward")
        if min_reward is not None and (value is None or value < min_reward):
            continue
        shown = _shown(s.get("prompt")) + "\n" + str(s.get("completion")) + "\n" + json.dumps(s.get("messages", ""))
        if text and text.lower() not in shown.lower():
            continue
        found.append(s)
        if len(found) >= limit:
            break
    return found


# Each kind of turn of a trajectory, told apart by colour and label (the browser test reads the classes).
TURN_STYLES = {
    "assistant": "background:#eef4ff;border-left:4px solid #3b6fd8",
    "call": "background:#fff6e5;border-left:4px solid #d88b1f",
    "tool": "background:#eaf7ee;border-left:4px solid #2f9a55",
}
TRAJECTORIES_SHOWN = 20


def trajectories_html(samples: list[dict]) -> str:
    """Multi-turn completions as turns: what the model wrote, each tool call with its arguments,
    each tool result, one block per kind. Empty when no sample has a trajectory."""
    blocks = []
    for s in [s for s in samples if s.get("messages")][:TRAJECTORIES_SHOWN]:
        turns = []
        for message in s["messages"]:
            if message.get("role") == "tool":
                turns.append(_turn("tool", f"{message.get('name', 'tool')} returned", message.get("content")))
                continue
            if completion_text(message):
                turns.append(_turn("assistant", "model", completion_text(message)))
            for call in message.get("tool_calls") or []:
                function = call.get("function", call)
                turns.append(_turn("call", f"calls {function.get('name')}",
                                   json.dumps(function.get("arguments"), ensure_ascii=False)))
        blocks.append(f'<div class="trajectory" style="margin:8px 0;padding:6px;border:1px solid #ccc">'
                      f'<div class="trajectory-head">step {escape(s.get("step"))} · reward '
                      f'{float(s.get("reward") or 0.0):.3g} · {escape(_shown(s.get("prompt")))}</div>'
                      f'{"".join(turns)}</div>')
    if not blocks:
        return ""
    return f'<div class="trajectories"><h4>Trajectories (newest {len(blocks)})</h4>{"".join(blocks)}</div>'


def trajectory_text(messages: list[dict]) -> str:
    """A trajectory as plain text, one turn per line (the workbench's table cells)."""
    lines = []
    for message in messages:
        if message.get("role") == "tool":
            lines.append(f"[{message.get('name', 'tool')} returned] {message.get('content')}")
            continue
        if completion_text(message):
            lines.append(completion_text(message))
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            lines.append(f"[calls {function.get('name')}] {json.dumps(function.get('arguments'), ensure_ascii=False)}")
    return "\n".join(lines)


def _turn(kind: str, label: str, content: Any) -> str:
    return (f'<div class="turn turn-{kind}" style="{TURN_STYLES[kind]};margin:3px 0;padding:3px 6px">'
            f'<b class="turn-label">{escape(label)}</b> <span class="turn-content" style="white-space:pre-wrap">'
            f'{escape(content)}</span></div>')


# --- adapters ----------------------------------------------------------------------------------


def adapter_choices(run_dir: Path) -> list[str]:
    """The run's adapters a user can pick, newest first (final/ first when there is one)."""
    return [p.name for p in reversed(RunDir(run_dir).adapters())]


def pick_adapter(run_dir: Path, name: str | None) -> Path | None:
    """The named adapter of the run (only names of existing adapters), else the newest."""
    found = {p.name: p for p in RunDir(run_dir).adapters()}
    if name and name in found:
        return found[name]
    return RunDir(run_dir).newest_adapter()


def checkpoints_markdown(run_dir: Path) -> str:
    names = [p.name if p.name != "final" else "final (the finished adapter)" for p in RunDir(run_dir).adapters()]
    return "**Checkpoints:** " + (", ".join(f"`{n}`" for n in names) if names else "none yet")


def zip_adapter(run_dir: Path, exports: Path, adapter: Path | None = None) -> Path:
    """The adapter (PEFT files, no optimizer state) and the run's config.yaml in one zip."""
    source = adapter or RunDir(run_dir).newest_adapter()
    if source is None:
        raise ValueError("this run has no adapter yet (no checkpoint, no final)")
    out = exports / f"{run_dir.name}-{source.name}-adapter.zip"
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != "trainer_state.pt":
                archive.write(path, f"{run_dir.name}-adapter/{path.name}")
        if RunDir(run_dir).config_file.is_file():
            archive.write(RunDir(run_dir).config_file, f"{run_dir.name}-adapter/training_config.yaml")
    os.replace(tmp, out)
    return out
