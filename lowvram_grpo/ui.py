"""The web app: set up a GRPO run, start it, watch it, use the adapter (`lowvram-grpo ui`).

The page never trains in its own process. Start writes the resolved config into the run
directory and launches the CLI trainer as a subprocess (see `jobs.py`); from then on the page
only reads the run directory every two seconds. A crash or an out-of-memory kill in training
cannot take the page down, and a reloaded page (or a restarted app) finds the job again.

Layout of the app's work directory (`--work-dir`, default `runs/app`):

    job.json      the current job: pid, run directory, command
    runs/<name>/  one run directory per run (config.yaml, status.json, metrics.jsonl, train.log, ...)
    uploads/      uploaded datasets (copied here; the browser's file names are never used as paths)
    rewards/      uploaded reward files (only with --allow-custom-code)
    exports/      adapter zips offered for download

Safety: the app listens on 127.0.0.1 unless --host or --share say otherwise; --auth-file (or
--auth, or $LOWVRAM_GRPO_AUTH) adds a login. Reward functions are Python code, so uploading them (or naming any reward that is
not a built-in) is refused unless the app was started with --allow-custom-code. The code_tests
reward runs the model's code (in the sandbox, see sandbox.py): only with --allow-code-execution.
Reward models and judge:self run nobody's code; a judge URL only in a local app. Datasets on the
server's disk can be named by path only when the app is local (127.0.0.1, no --share); otherwise
only uploads, built-ins and hub ids are accepted.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import inspect
import json
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils
import pandas as pd

from lowvram_grpo.config import (LOSS_TYPES, ConfigError, TrainConfig, build_config, list_presets, preset_path,
                                 read_yaml)
from lowvram_grpo.data import SUPPORTED, DatasetError, _looks_like_path, load_prompt_data, preview
from lowvram_grpo.jobs import LOG_NAME, JobError, JobManager, run_state, tail
from lowvram_grpo.model import ModelLoadError, check_model_available
from lowvram_grpo.rewards import BUILTIN_REWARDS, completion_text
from lowvram_grpo.rundir import RunDir

DEFAULT_WORK_DIR = "runs/app"
MAX_UPLOAD_MB = 200
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DATASET_SUFFIXES = list(SUPPORTED) + [ext + ".gz" for ext in SUPPORTED if ext != ".parquet"]
REWARD_SLOTS = 3
PLAN_TIMEOUT_S = 10  # an unknown hub id offline retries for ~25 s; do not hold the page that long
PREVIEW_TIMEOUT_S = 30  # a hub dataset preview downloads it
REFRESH_EVERY_S = 2.0

# The setup form, in the order the /check and /start endpoints take their inputs.
CONFIG_FIELDS = ["model_name_or_path", "dataset", "prompt_column", "answer_column", "num_generations",
                 "max_prompt_length", "max_completion_length", "learning_rate", "max_steps", "lora_r",
                 "beta", "loss_type"]
REWARD_FIELDS = [f"{kind}_{i}" for i in range(1, REWARD_SLOTS + 1) for kind in ("reward", "weight")]
FORM_KEYS = ["preset", *CONFIG_FIELDS, *REWARD_FIELDS, "run_name"]
# Fields that show their own error message under them.
ERROR_FIELDS = ["preset", *CONFIG_FIELDS, *(f"reward_{i}" for i in range(1, REWARD_SLOTS + 1)), "run_name"]

# Lookups that may go to the network (a model's config, a hub dataset) run here, with a timeout.
_background = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="lookup")


@dataclasses.dataclass(frozen=True)
class AppContext:
    """Where the app keeps its files, and what it allows."""

    work_dir: Path
    allow_custom_code: bool = False
    allow_local_paths: bool = True  # name server-side dataset files by path (local app only)
    allow_code_execution: bool = False  # offer code_tests, which runs the model's code (sandboxed)

    @property
    def runs_dir(self) -> Path:
        return self.work_dir / "runs"

    def subdir(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# --- setup: presets, form -> config, checks ----------------------------------------------------


def preset_form_values(preset: str | None) -> dict[str, Any]:
    """The form's values for a preset (its YAML over the defaults); run_name is left empty."""
    values = TrainConfig().to_dict()
    if preset:
        values.update(build_config(read_yaml(preset_path(preset))).to_dict())
    form = {"preset": preset or "", "run_name": ""}
    for key in CONFIG_FIELDS:
        form[key] = values[key]
    form["answer_column"] = values["answer_column"] or ""
    form["learning_rate"] = f"{values['learning_rate']:g}"
    rewards = values["rewards"]
    for i in range(1, REWARD_SLOTS + 1):
        spec = rewards[i - 1] if i <= len(rewards) else None
        form[f"reward_{i}"] = spec["name"] if spec else ""
        form[f"weight_{i}"] = spec["weight"] if spec else 1.0
    return form


def _field_of(message: str) -> str:
    """The form field a `key: message` error belongs to."""
    key = message.split(":", 1)[0].strip()
    if key == "rewards":
        return "reward_1"
    return key if key in ERROR_FIELDS else "general"


def _dataset_error_field(message: str) -> str:
    if "prompt_column" in message:
        return "prompt_column"
    if "answer_column" in message:
        return "answer_column"
    return "dataset"


def source_kind(source: str) -> str:
    """"builtin", "local" (a file or folder on the server) or "hub"."""
    if source.startswith("builtin:"):
        return "builtin"
    return "local" if Path(source).expanduser().exists() or _looks_like_path(source) else "hub"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def safe_run_name(name: str) -> str:
    name = (name or "").strip()
    return name or time.strftime("run-%Y%m%d-%H%M%S")


def form_to_config(form: dict[str, Any], ctx: AppContext,
                   check_data: bool = True) -> tuple[TrainConfig | None, dict[str, str]]:
    """Build and validate the TrainConfig the form describes: (config, {}) or (None, errors),
    where errors maps a form field (or "general") to its message. All fields are checked, not
    just the first bad one, so every problem shows next to its field at once."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    preset = form.get("preset") or ""
    if preset:
        try:
            values.update(read_yaml(preset_path(preset)))
        except ConfigError as err:
            errors["preset"] = str(err)
    for key in CONFIG_FIELDS:
        value = form.get(key)
        values[key] = value.strip() if isinstance(value, str) else value
    values["answer_column"] = values["answer_column"] or None
    for key in ("model_name_or_path", "dataset", "prompt_column"):
        if not values[key]:
            errors[key] = f"{key}: required"
    rewards = []
    for i in range(1, REWARD_SLOTS + 1):
        name, weight = (form.get(f"reward_{i}") or "").strip(), form.get(f"weight_{i}")
        if not name:
            continue
        problem = _reward_problem(name, ctx)
        if problem:
            errors[f"reward_{i}"] = problem
        elif not isinstance(weight, (int, float)) or isinstance(weight, bool):
            errors[f"reward_{i}"] = f"reward {name}: give a weight (a number such as 1.0)"
        else:
            rewards.append({"name": name, "weight": float(weight)})
    if not rewards and not any(k.startswith("reward_") for k in errors):
        errors["reward_1"] = "rewards: pick at least one reward function"
    values["rewards"] = rewards or ["arith_answer"]  # placeholder so the other keys still get checked

    run_name = safe_run_name(form.get("run_name") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", run_name):
        errors["run_name"] = "run name: letters, digits, '.', '_' and '-' only (at most 64)"
    elif (ctx.runs_dir / run_name).exists():
        errors["run_name"] = f"run '{run_name}' already exists: resume it on the Train tab, or choose another name"
    values["output_dir"] = str((ctx.runs_dir / run_name).resolve())

    source = values["dataset"] or ""
    if source and source_kind(source) == "local":
        path = Path(source).expanduser()
        if not ctx.allow_local_paths and not _inside(path, ctx.work_dir / "uploads"):
            errors["dataset"] = ("dataset: this app is shared, so it only reads uploaded files: upload the "
                                 "dataset, or give a built-in or hub dataset id")
        else:
            values["dataset"] = str(path.resolve())
    if any(key.startswith("reward_") for key in errors):  # keep the placeholder out of the config check
        values.pop("rewards")

    config = None
    while True:  # collect one error per field: drop the bad key and check the rest again
        try:
            config = build_config(values)
            break
        except ConfigError as err:
            key = str(err).split(":", 1)[0].strip()
            field = _field_of(str(err))
            errors.setdefault(field, str(err))
            if key not in values:
                break
            values.pop(key)
    if config is not None and check_data and not errors and source_kind(config.dataset) != "hub":
        try:  # columns and every row, without a tokenizer (the length check needs the model)
            load_prompt_data(config)
        except DatasetError as err:
            errors[_dataset_error_field(str(err))] = str(err)
    if config is not None and check_data and not errors:
        try:  # a hub model that is not downloaded while offline would fail only after Start
            check_model_available(config.model_name_or_path)
        except ModelLoadError as err:
            errors[_field_of(str(err))] = str(err)
    return (None, errors) if errors else (config, {})


def _reward_problem(name: str, ctx: AppContext) -> str | None:
    """Reward names other than built-ins run the user's Python code: only with opt-in. So does
    code_tests (the model's code, sandboxed); reward models and judge:self run no code of
    anyone's, and a judge URL is reached from this server, so only a local app may name one."""
    if name == "code_tests" and not ctx.allow_code_execution:
        return ("reward 'code_tests' runs the model's code on this machine (sandboxed); start the app with "
                "--allow-code-execution to offer it")
    if name in BUILTIN_REWARDS or name == "judge:self" or (name.startswith("model:") and len(name) > 6):
        return None
    if name.startswith("judge:") and (ctx.allow_local_paths or ctx.allow_custom_code):
        return None
    if not ctx.allow_custom_code:
        return (f"reward '{name}': only built-in rewards are allowed; start the app with "
                "--allow-custom-code to use your own reward functions")
    if ":" in name:
        path, function = name.rsplit(":", 1)
        if path.endswith(".py"):
            if not Path(path).is_file():
                return f"reward '{name}': file not found: {path}"
            if function not in reward_functions_in_file(Path(path)):
                return f"reward '{name}': {Path(path).name} defines no top-level function '{function}'"
    return None


def reward_functions_in_file(path: Path) -> list[str]:
    """Top-level function names of a Python file, read without running it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=path.name)
    except (SyntaxError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{path.name} is not valid Python: {err}") from None
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]


def memory_plan_text(config: TrainConfig, vram_gb: float | None) -> str:
    """memory.format_plan for the config, or the reason there is none: never raises."""
    if not vram_gb or vram_gb <= 0:
        return "Give the GPU memory (GB) to plan for."

    def compute() -> str:
        from lowvram_grpo.planner import format_plan, plan

        return format_plan(plan(config, float(vram_gb)))

    try:
        return _background.submit(compute).result(timeout=PLAN_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        return (f"No memory plan: finding the config of '{config.model_name_or_path}' took more than "
                f"{PLAN_TIMEOUT_S} s (offline?). A local directory or a shipped architecture name works offline.")
    except Exception as err:  # the planner is an estimate: its failure must never break the page
        return f"No memory plan: {err}"


def plan_headline(plan_text: str) -> str:
    if not plan_text:
        return ""
    line = next((ln for ln in plan_text.splitlines() if ln.startswith("needs ~")), "")
    return f"**{line}**" if line else plan_text.splitlines()[0]


# --- uploads -----------------------------------------------------------------------------------


def save_upload(uploaded: str, dest_dir: Path, suffixes: list[str]) -> Path:
    """Copy a file gradio received into `dest_dir` under a safe name. The path must be one of
    gradio's own upload files: a path a client made up is refused."""
    src = Path(uploaded).resolve()
    if not _inside(src, Path(gradio.utils.get_upload_folder())) or not src.is_file():
        raise ValueError("not an uploaded file")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", src.name).lstrip(".") or "upload"
    if not name.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{src.name}: unsupported file type; use {', '.join(suffixes)}")
    if src.stat().st_size > MAX_UPLOAD_MB * 2**20:
        raise ValueError(f"{src.name} is larger than {MAX_UPLOAD_MB} MB")
    dest = dest_dir / name
    stem, n = name, 1
    while dest.exists():
        n += 1
        dest = dest_dir / f"{n}-{stem}"
    shutil.copyfile(src, dest)
    return dest


def preview_table(source: str, n: int = 5) -> tuple[list[str], pd.DataFrame]:
    """Columns and first rows of a dataset; raises DatasetError (also for a slow hub download)."""
    try:
        columns, rows = _background.submit(preview, source, n).result(timeout=PREVIEW_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise DatasetError(f"{source}: no answer within {PREVIEW_TIMEOUT_S} s (offline?)") from None
    text = lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)  # noqa: E731
    return columns, pd.DataFrame([[text(row.get(c)) for c in columns] for row in rows], columns=columns)


# --- watching a run ----------------------------------------------------------------------------

PLOTS = {  # plot name -> metric keys (a reward plot also gets every rewards/<fn>/mean)
    "reward": ["reward"], "kl": ["kl"], "loss": ["loss"], "length": ["completions/mean_length"]}


def plot_frames(records: list[dict]) -> dict[str, pd.DataFrame]:
    """Long-format (step, value, series) frames for the line plots."""
    frames = {}
    for name, keys in PLOTS.items():
        if name == "reward":  # the total, and each function's mean when there are several
            per_function = sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")})
            keys = keys + per_function if len(per_function) > 1 else keys
        rows = [(r["step"], r[k], k.removeprefix("rewards/").removesuffix("/mean"))
                for r in records for k in keys if isinstance(r.get(k), (int, float))]
        frames[name] = pd.DataFrame(rows, columns=["step", "value", "series"]).astype(
            {"step": "int64", "value": "float64", "series": "str"})
    return frames


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def status_html(run_name: str, status: dict, records: list[dict]) -> str:
    """One line of state, progress, ETA and memory, with a progress bar; the error if failed."""
    state = status.get("state", "empty")
    run_name = _escape(run_name)
    if state == "empty":
        return f"<div class='run-status'><b>{run_name}</b>: no status yet</div>"
    step = int(status.get("step") or (records[-1]["step"] if records else 0))
    total = int(status.get("total_steps") or 0)
    parts = [f"<b>{state}</b>", f"run <code>{run_name}</code>"]
    if status.get("note"):
        parts.append(str(status["note"]))
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
    html = f"<div class='run-status state-{state}'>{' · '.join(parts)}"
    if total:
        html += f"<br><progress value='{step}' max='{total}' style='width:100%'></progress>"
    if status.get("error"):
        html += f"<pre class='run-error'>{_escape(str(status['error']))}</pre>"
    return html + "</div>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def completion_rows(records: list[dict], limit: int = 12) -> pd.DataFrame:
    """The newest sampled completions, newest step first."""
    def shown(prompt: Any) -> str:
        return completion_text(prompt) if isinstance(prompt, (str, list)) else str(prompt or "")

    rows = [[r.get("step"), shown(r.get("prompt")), str(r.get("completion")),
             round(float(r.get("reward") or 0.0), 4), round(float(r.get("advantage") or 0.0), 4)]
            for r in reversed(records[-limit:])]
    return pd.DataFrame(rows, columns=["step", "prompt", "completion", "reward", "advantage"])


def adapter_dir(run_dir: Path) -> Path | None:
    """The run's final adapter, else its newest checkpoint."""
    return RunDir(run_dir).newest_adapter()


def checkpoints_markdown(run_dir: Path) -> str:
    names = [p.name if p.name != "final" else "final (the finished adapter)" for p in RunDir(run_dir).adapters()]
    return "**Checkpoints:** " + (", ".join(f"`{n}`" for n in names) if names else "none yet")


def zip_adapter(run_dir: Path, exports: Path) -> Path:
    """The adapter (PEFT files, no optimizer state) and the run's config.yaml in one zip."""
    source = adapter_dir(run_dir)
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


# --- "try it": base vs adapter, in this process, only when asked -------------------------------


class AdapterPlayground:
    """Loads one run's model + adapter on demand (cached) and generates greedily with the
    adapter off (the base model) and on, for side-by-side comparison."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._loaded: tuple | None = None  # (policy, tokenizer, config)

    def generate(self, run_dir: Path, prompt: str, max_new_tokens: int) -> tuple[str, str]:
        from lowvram_grpo.prompts import with_system_prompt
        from lowvram_grpo.model import reference_model
        from lowvram_grpo.rollout import generate_greedy

        with self._lock:
            policy, tokenizer, config = self._load(run_dir)
            messages = with_system_prompt(prompt, config.system_prompt)  # as the run's training prompts

            def run() -> str:
                return generate_greedy(policy, tokenizer, [messages], chunk_size=1, max_new_tokens=max_new_tokens,
                                       max_prompt_length=config.max_prompt_length).completions[0]

            with reference_model(policy):
                base = run()
            return base, run()

    def _load(self, run_dir: Path):
        import torch

        from lowvram_grpo.model import load_policy

        source = adapter_dir(run_dir)
        if source is None:
            raise ValueError("this run has no adapter yet: wait for the first checkpoint")
        weights = source / "adapter_model.safetensors"
        key = (str(source), weights.stat().st_mtime if weights.exists() else 0)
        if key != self._key:
            self._loaded = self._key = None  # free the previous model before loading the next
            config = RunDir(run_dir).read_config({"adapter_path": str(source), "gradient_checkpointing": False})
            if config.cpu_threads and not torch.cuda.is_available():
                torch.set_num_threads(config.cpu_threads)
            policy, tokenizer = load_policy(config)
            policy.eval()
            self._loaded, self._key = (policy, tokenizer, config), key
        return self._loaded


# --- the page ----------------------------------------------------------------------------------

CSS = """
.field-error, .field-error * { color: #b91c1c !important; font-size: 0.9em; }
.field-error p { margin: 0; }
.run-status { padding: 6px 0; }
.run-error { color: #b91c1c; white-space: pre-wrap; }
"""


def _line_plot(label: str, y_title: str, elem_id: str) -> gr.LinePlot:
    return gr.LinePlot(x="step", y="value", label=label, y_title=y_title, elem_id=elem_id, height=280)


def _named_inputs(fn, names: list[str]):
    """Give a `*values` handler named parameters, so the API (gradio_client) shows and accepts
    the form's field names: client.predict(preset="tiny-cpu", ..., api_name="/start")."""
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])
    return fn


def list_runs(ctx: AppContext) -> list[str]:
    """Run directories in the work dir, newest first."""
    if not ctx.runs_dir.is_dir():
        return []
    runs = [p for p in ctx.runs_dir.iterdir() if p.is_dir() and RunDir(p).config_file.is_file()]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def _run_dir(ctx: AppContext, name: str | None) -> Path | None:
    """A run directory from a name the browser sent: only names of existing runs are accepted."""
    return ctx.runs_dir / name if name and name in list_runs(ctx) else None


def build_app(work_dir: str | Path = DEFAULT_WORK_DIR, allow_custom_code: bool = False,
              allow_local_paths: bool = True, allow_code_execution: bool = False) -> gr.Blocks:
    ctx = AppContext(Path(work_dir).resolve(), allow_custom_code, allow_local_paths, allow_code_execution)
    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = JobManager(ctx.work_dir)
    playground = AdapterPlayground()
    presets = list_presets()
    initial = preset_form_values("tiny-cpu" if "tiny-cpu" in presets else None)
    reward_choices = [""] + sorted(n for n in BUILTIN_REWARDS if n != "code_tests" or allow_code_execution) \
        + ["judge:self"]

    with gr.Blocks(title="lowvram-grpo", analytics_enabled=False) as demo:
        gr.Markdown("# lowvram-grpo\nGRPO fine-tuning on one GPU: set up a run, start it, watch the reward "
                    "climb, use the adapter. Training runs in its own process; this page reads its run "
                    f"directory under `{ctx.runs_dir}`.")
        fields: dict[str, gr.components.Component] = {}
        errors: dict[str, gr.Markdown] = {}

        def form_field(key: str, component):
            fields[key] = component
            component.elem_id = component.elem_id or f"field-{key}"
            if key in ERROR_FIELDS:
                errors[key] = gr.Markdown(visible=False, elem_classes=["field-error"], elem_id=f"error-{key}")
            return component

        with gr.Tabs() as tabs:
            with gr.Tab("1. Set up", id="setup"):
                with gr.Row():
                    with gr.Column():
                        form_field("preset", gr.Dropdown(["", *presets], value=initial["preset"], label="Preset",
                                                         info="fills the form; other settings come from it too"))
                    with gr.Column():
                        form_field("model_name_or_path", gr.Textbox(initial["model_name_or_path"],
                                                                    label="Model (hub id or local directory)"))
                gr.Markdown("### Dataset")
                with gr.Row():
                    with gr.Column():
                        dataset_file = gr.File(label=f"Upload a dataset (JSONL, JSON, CSV, TSV, Parquet; up to "
                                                     f"{MAX_UPLOAD_MB} MB)", file_types=DATASET_SUFFIXES,
                                               elem_id="dataset-upload")
                    with gr.Column():
                        form_field("dataset", gr.Textbox(initial["dataset"], label="Dataset",
                                                         info="builtin:arith, a hub dataset id, or the uploaded file"))
                        preview_button = gr.Button("Preview", size="sm")
                with gr.Row():
                    with gr.Column():
                        form_field("prompt_column", gr.Dropdown(["prompt"], value=initial["prompt_column"],
                                                                allow_custom_value=True, label="Prompt column"))
                    with gr.Column():
                        form_field("answer_column", gr.Dropdown(["", "answer"], value=initial["answer_column"],
                                                                allow_custom_value=True,
                                                                label="Answer column (optional)"))
                preview_message = gr.Markdown()
                preview_df = gr.Dataframe(label="First rows", interactive=False, max_height=220)

                gr.Markdown("### Rewards")
                if allow_custom_code:
                    reward_file = gr.File(label="Upload a Python reward file (TRL signature: "
                                                "fn(prompts, completions, **columns) -> list[float])",
                                          file_types=[".py"])
                    gr.Markdown("Custom reward code is **on** (--allow-custom-code): uploaded files run in the "
                                "training process with this server's permissions.")
                    reward_message = gr.Markdown()
                else:
                    reward_file = None
                    gr.Markdown("Only built-in reward functions and `judge:self`: start the app with "
                                "`--allow-custom-code` to upload your own (Python files run with the server's "
                                "permissions) or to type a reward model (`model:<hub id>`) or a judge server "
                                "(`judge:<URL>`).")
                gr.Markdown("Code execution (`code_tests`) is **on** (--allow-code-execution): the model's code "
                            "runs in the sandbox on this machine." if allow_code_execution else
                            "Code execution (`code_tests`) is off: start the app with `--allow-code-execution` "
                            "to reward code by running it against the dataset's tests.")
                for i in range(1, REWARD_SLOTS + 1):
                    with gr.Row():
                        with gr.Column(scale=3):
                            form_field(f"reward_{i}", gr.Dropdown(reward_choices, value=initial[f"reward_{i}"],
                                                                  label=f"Reward {i}",
                                                                  allow_custom_value=allow_custom_code))
                        with gr.Column(scale=1):
                            fields[f"weight_{i}"] = gr.Number(initial[f"weight_{i}"], label="weight")

                gr.Markdown("### Hyperparameters")
                with gr.Row():
                    for key, label in (("num_generations", "G (completions per prompt)"),
                                       ("max_prompt_length", "Max prompt tokens"),
                                       ("max_completion_length", "Max completion tokens"),
                                       ("max_steps", "Steps"), ("lora_r", "LoRA rank")):
                        with gr.Column(min_width=140):
                            form_field(key, gr.Number(initial[key], label=label, precision=0))
                with gr.Row():
                    with gr.Column(min_width=140):
                        form_field("learning_rate", gr.Textbox(initial["learning_rate"], label="Learning rate"))
                    with gr.Column(min_width=140):
                        form_field("beta", gr.Number(initial["beta"], label="beta (KL weight)"))
                    with gr.Column(min_width=140):
                        form_field("loss_type", gr.Dropdown(list(LOSS_TYPES), value=initial["loss_type"],
                                                            label="Loss type"))
                    with gr.Column(min_width=140):
                        form_field("run_name", gr.Textbox("", label="Run name", placeholder="automatic"))

                gr.Markdown("### Memory")
                with gr.Row():
                    vram_gb = gr.Number(16, label="GPU memory to plan for (GB)", minimum=0)
                    check_button = gr.Button("Check settings and memory")
                plan_summary = gr.Markdown()
                plan_box = gr.Code(label="Memory plan", language=None, interactive=False, visible=False)
                check_message = gr.Markdown(elem_id="check-message")
                start_button = gr.Button("Start training", variant="primary", elem_id="start")
                start_message = gr.Markdown(elem_id="start-message")

            with gr.Tab("2. Train and watch", id="watch"):
                with gr.Row():
                    # Any value is accepted here and checked by _run_dir: the choices change per session.
                    run_choice = gr.Dropdown(list_runs(ctx), label="Run", scale=3, elem_id="run-choice",
                                             allow_custom_value=True)
                    stop_button = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="stop")
                    resume_button = gr.Button("Resume", elem_id="resume")
                job_message = gr.Markdown(elem_id="job-message")
                status_box = gr.HTML(elem_id="run-status")
                with gr.Row():
                    reward_plot = gr.LinePlot(x="step", y="value", color="series", label="Reward", y_title="reward",
                                              color_title="", elem_id="plot-reward", height=280)
                    kl_plot = _line_plot("KL", "kl", "plot-kl")
                with gr.Row():
                    loss_plot = _line_plot("Loss", "loss", "plot-loss")
                    length_plot = _line_plot("Completion length (tokens)", "mean length", "plot-length")
                checkpoints_box = gr.Markdown(elem_id="checkpoints")
                completions_df = gr.Dataframe(label="Latest sampled completions", interactive=False,
                                              max_height=300)
                log_box = gr.Textbox(label="Log (train.log)", lines=10, max_lines=10, interactive=False,
                                     autoscroll=True)

            with gr.Tab("3. Use the adapter", id="use"):
                gr.Markdown("Uses the selected run's `final/` adapter, or its newest checkpoint.")
                with gr.Row():
                    zip_button = gr.Button("Zip the adapter for download")
                    adapter_file = gr.File(label="Adapter (PEFT format)", interactive=False)
                gr.Markdown("**Try it**: greedy generation with the adapter off (the base model) and on. The model "
                            "loads into this app's process the first time you ask.")
                try_prompt = gr.Textbox(label="Prompt", placeholder="3+5=")
                try_tokens = gr.Number(32, label="Max new tokens", precision=0, minimum=1, maximum=2048)
                try_button = gr.Button("Generate")
                with gr.Row():
                    base_out = gr.Textbox(label="Base model (adapter off)", interactive=False)
                    tuned_out = gr.Textbox(label="With the adapter", interactive=False)
                use_message = gr.Markdown()

        timer = gr.Timer(REFRESH_EVERY_S)
        seen = gr.State("")
        form_inputs = [fields[k] for k in FORM_KEYS]
        error_outputs = [errors[k] for k in ERROR_FIELDS]

        # --- handlers --------------------------------------------------------------------------

        def error_updates(found: dict[str, str]) -> list:
            return [gr.update(value=f"⚠ {found[k]}" if k in found else "", visible=k in found) for k in ERROR_FIELDS]

        def problems_markdown(found: dict[str, str]) -> str:
            return f"**Fix {len(found)} problem{'s' * (len(found) > 1)} first:**\n" + "\n".join(
                f"- {message}" for message in found.values())

        def form_dict(values) -> dict[str, Any]:
            return dict(zip(FORM_KEYS, values))

        def load_preset(preset):
            try:
                form = preset_form_values(preset or None)
            except ConfigError as err:
                return [gr.skip()] * (len(FORM_KEYS) - 1) + [gr.update(value=f"⚠ {err}", visible=True)]
            return [form[k] for k in FORM_KEYS if k != "preset"] + [gr.update(value="", visible=False)]

        def auto_preview(source, prompt_column, answer_column):
            if source_kind((source or "").strip()) == "hub":  # may mean a download: only on request
                return gr.skip(), gr.skip(), gr.skip(), "Press Preview to load the first rows of the hub dataset."
            return do_preview(source, prompt_column, answer_column)

        def do_preview(source, prompt_column, answer_column):
            source = (source or "").strip()
            if source and source_kind(source) == "local" and not ctx.allow_local_paths and \
                    not _inside(Path(source).expanduser(), ctx.work_dir / "uploads"):
                return gr.skip(), gr.skip(), gr.skip(), "⚠ this app is shared: upload the dataset instead"
            try:
                columns, table = preview_table(source)
            except DatasetError as err:
                return pd.DataFrame(), gr.skip(), gr.skip(), f"⚠ {err}"
            except Exception as err:  # e.g. a hub error: say so on the page
                return pd.DataFrame(), gr.skip(), gr.skip(), f"⚠ could not read {source}: {err}"
            note = f"Columns: {', '.join(f'`{c}`' for c in columns)}."
            if prompt_column not in columns:
                guess = next((c for c in ("prompt", "question", "problem", "instruction", "input", "query")
                              if c in columns), None)
                if guess:
                    note += f" Prompt column set to `{guess}`."
                    prompt_column = guess
                else:
                    note += f" There is no `{prompt_column}` column: pick the prompt column."
            if answer_column and answer_column not in columns:
                answer_column = next((c for c in ("answer", "solution", "target", "label") if c in columns), "")
                note += f" Answer column set to `{answer_column or '(none)'}`."
            return (table, gr.update(choices=columns, value=prompt_column),
                    gr.update(choices=["", *columns], value=answer_column), note)

        def upload_dataset(file, prompt_column, answer_column):
            if not file:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
            try:
                saved = save_upload(file, ctx.subdir("uploads"), DATASET_SUFFIXES)
            except ValueError as err:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠ {err}"
            table, prompt_update, answer_update, note = do_preview(str(saved), prompt_column, answer_column)
            return str(saved), table, prompt_update, answer_update, f"Saved as `{saved.name}`. {note}"

        def upload_reward(file):
            if not file or not allow_custom_code:
                return [gr.skip()] * REWARD_SLOTS + ["⚠ custom reward code is off (--allow-custom-code)"]
            try:
                saved = save_upload(file, ctx.subdir("rewards"), [".py"])
                functions = reward_functions_in_file(saved)
            except ValueError as err:
                return [gr.skip()] * REWARD_SLOTS + [f"⚠ {err}"]
            choices = list(reward_choices)
            for path in sorted(ctx.subdir("rewards").glob("*.py")):  # every file uploaded so far
                try:
                    choices += [(f"{path.name}:{fn}", f"{path}:{fn}") for fn in reward_functions_in_file(path)]
                except ValueError:
                    continue
            return [gr.update(choices=choices)] * REWARD_SLOTS + [
                f"`{saved.name}` defines: {', '.join(functions) or 'no public functions'}; pick them as rewards below."]

        def check(*values):
            *form_values, vram = values
            config, found = form_to_config(form_dict(form_values), ctx)
            if config is None:
                return [*error_updates(found), problems_markdown(found), "", gr.update(value="", visible=False)]
            text = memory_plan_text(config, vram)
            return [*error_updates({}), "✓ Settings are valid.", plan_headline(text),
                    gr.update(value=text, visible=True)]

        def start(*values):
            running = jobs.running()
            if running is not None:
                return [*[gr.skip()] * len(ERROR_FIELDS), f"⚠ A training is already running (run "
                        f"'{Path(running.run_dir).name}'): stop it first.", gr.skip(), gr.skip()]
            config, found = form_to_config(form_dict(values), ctx)
            if config is None:
                return [*error_updates(found), problems_markdown(found), gr.skip(), gr.skip()]
            try:
                job = jobs.start(config)
            except JobError as err:
                return [*error_updates({}), f"⚠ {err}", gr.skip(), gr.skip()]
            name = Path(job.run_dir).name
            return [*error_updates({}), f"Started run `{name}` (pid {job.pid}).",
                    gr.update(choices=list_runs(ctx), value=name), gr.Tabs(selected="watch")]

        def stop():
            try:
                return jobs.stop()
            except JobError as err:
                return f"⚠ {err}"

        def resume(name):
            run_dir = _run_dir(ctx, name)
            if run_dir is None:
                return "⚠ choose a run to resume"
            try:
                job = jobs.resume(run_dir)
            except JobError as err:
                return f"⚠ {err}"
            return f"Resumed run `{name}` (pid {job.pid}) from {RunDir(run_dir).latest_checkpoint().name}."

        def refresh(name, last_seen):
            run_dir = _run_dir(ctx, name)
            if run_dir is None:
                if last_seen == "none":
                    return [gr.skip()] * (len(watch_outputs) - 1) + ["none"]
                empty = plot_frames([])
                return ["No run selected: start one on the Set up tab.", *empty.values(), pd.DataFrame(),
                        "", "", "none"]
            status = run_state(run_dir, jobs)
            records = RunDir(run_dir).metrics()
            key = f"{name}:{len(records)}:{status.get('state')}"
            if key == last_seen:  # nothing new: leave the plots alone (no redraw, no flicker)
                return [status_html(name, status, records), *[gr.skip()] * 4, gr.skip(),
                        tail(run_dir / LOG_NAME), checkpoints_markdown(run_dir), key]
            frames = plot_frames(records)
            samples = RunDir(run_dir).completions()
            return [status_html(name, status, records), *frames.values(), completion_rows(samples),
                    tail(run_dir / LOG_NAME), checkpoints_markdown(run_dir), key]

        def on_load():
            """Reattach: show the running job if there is one, else the newest run."""
            runs = list_runs(ctx)
            job = jobs.running()
            if job is not None and Path(job.run_dir).name in runs:
                name = Path(job.run_dir).name
                return gr.update(choices=runs, value=name), f"Reattached to the running training `{name}`."
            return gr.update(choices=runs, value=runs[0] if runs else None), ""

        def make_zip(name):
            run_dir = _run_dir(ctx, name)
            if run_dir is None:
                return None, "⚠ choose a run on the Train tab first"
            try:
                out = zip_adapter(run_dir, ctx.subdir("exports"))
            except ValueError as err:
                return None, f"⚠ {err}"
            return str(out), f"Adapter from `{adapter_dir(run_dir).name}` zipped."

        def try_it(name, prompt, max_new_tokens):
            run_dir = _run_dir(ctx, name)
            if run_dir is None:
                return "", "", "⚠ choose a run on the Train tab first"
            if not prompt:
                return "", "", "⚠ type a prompt"
            import torch

            if jobs.running() is not None and torch.cuda.is_available():
                return "", "", "⚠ training is using the GPU: try the adapter when it has stopped or finished"
            try:
                base, tuned = playground.generate(run_dir, prompt, int(max_new_tokens or 32))
            except Exception as err:  # show any load/generation failure on the page, never crash it
                return "", "", f"⚠ {type(err).__name__}: {err}"
            return base, tuned, f"Adapter: `{adapter_dir(run_dir).name}`, greedy decoding."

        # --- wiring (every event has an api_name, so gradio_client and scripts can drive it) ---
        preview_io = ([fields["dataset"], fields["prompt_column"], fields["answer_column"]],
                      [preview_df, fields["prompt_column"], fields["answer_column"], preview_message])
        fields["preset"].input(load_preset, fields["preset"], [fields[k] for k in FORM_KEYS if k != "preset"]
                               + [errors["preset"]], api_name="load_preset").then(
            auto_preview, *preview_io, api_visibility="private")
        dataset_file.upload(upload_dataset, [dataset_file, fields["prompt_column"], fields["answer_column"]],
                            [fields["dataset"], preview_df, fields["prompt_column"], fields["answer_column"],
                             preview_message], api_name="upload_dataset")
        preview_button.click(do_preview, *preview_io, api_name="preview_dataset")
        if reward_file is not None:
            reward_file.upload(upload_reward, reward_file,
                               [fields[f"reward_{i}"] for i in range(1, REWARD_SLOTS + 1)] + [reward_message],
                               api_name="upload_reward")
        check_button.click(_named_inputs(check, FORM_KEYS + ["vram_gb"]), form_inputs + [vram_gb],
                           error_outputs + [check_message, plan_summary, plan_box],
                           api_name="check")
        start_button.click(_named_inputs(start, FORM_KEYS), form_inputs,
                           error_outputs + [start_message, run_choice, tabs],
                           api_name="start", concurrency_limit=1)
        stop_button.click(stop, None, job_message, api_name="stop")
        resume_button.click(resume, run_choice, job_message, api_name="resume", concurrency_limit=1)
        watch_outputs = [status_box, reward_plot, kl_plot, loss_plot, length_plot, completions_df, log_box,
                         checkpoints_box, seen]
        timer.tick(refresh, [run_choice, seen], watch_outputs, api_name="refresh", show_progress="hidden",
                   concurrency_limit=None)
        run_choice.change(refresh, [run_choice, gr.State("")], watch_outputs, show_progress="hidden",
                          api_visibility="private")
        demo.load(on_load, None, [run_choice, job_message], api_name="on_load")
        demo.load(auto_preview, *preview_io, api_visibility="private")
        zip_button.click(make_zip, run_choice, [adapter_file, use_message], api_name="zip_adapter")
        try_button.click(try_it, [run_choice, try_prompt, try_tokens], [base_out, tuned_out, use_message],
                         api_name="try_it")
    demo.jobs = jobs  # for tests and shutdown hooks
    demo.app_context = ctx
    return demo


def launch(host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: list[tuple[str, str]] | None = None, allow_custom_code: bool = False,
           work_dir: str | Path = DEFAULT_WORK_DIR, prevent_thread_lock: bool = False, quiet: bool = False,
           allow_code_execution: bool = False):
    """Build the app and serve it; returns the Blocks (serving in the background with
    prevent_thread_lock=True). Local by default: --host, --share and --auth are explicit opt-ins."""
    local = host in LOCAL_HOSTS and not share
    if not local and auth is None:
        print("warning: the app is reachable from other machines without a login; anyone who can open it can "
              "start training and read its runs. Add --auth-file FILE (USER:PASS lines) or --auth user:pass.", flush=True)
    demo = build_app(work_dir, allow_custom_code=allow_custom_code, allow_local_paths=local,
                     allow_code_execution=allow_code_execution)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=share, auth=auth,
                       max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[str(demo.app_context.subdir("exports"))],
                       prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True, css=CSS,
                       footer_links=["api"])
    running = demo.jobs.running()
    if running is not None and not prevent_thread_lock:  # the app was stopped (Ctrl-C), training was not
        print(f"training continues in the background (run {Path(running.run_dir).name}, pid {running.pid}); "
              "start the app again to watch or stop it", flush=True)
    return demo
