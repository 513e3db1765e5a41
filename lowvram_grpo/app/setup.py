"""The app's Set-up form without gradio: every config key as a form field, form -> TrainConfig
(with one error per field) and back, the memory plan, the CLI command and config.yaml, uploads.

The form holds every TrainConfig key but `rewards` (three name + weight slots) and
`output_dir` (the run name), so nothing a run can use is hidden from the page. Keys with a
typed widget on the page are FORM_TYPED; every other key is a text field holding YAML
(`0.9`, `null`, `[q_proj, v_proj]`, `auto`), in the groups and with the help that config.py
declares for each key.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import json
import re
import shlex
import shutil
import time
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lowvram_grpo import vision
from lowvram_grpo.config import ConfigError, TrainConfig, build_config, preset_path, read_yaml
from lowvram_grpo.config_docs import key_groups
from lowvram_grpo.data import DatasetError, load_prompt_data, preview
from lowvram_grpo.model import ModelLoadError, check_model_available
from lowvram_grpo.rewards.builtins import BUILTIN_REWARDS
from lowvram_grpo.tables import SUPPORTED, _looks_like_path

MAX_UPLOAD_MB = 200
DATASET_SUFFIXES = list(SUPPORTED) + [ext + ".gz" for ext in SUPPORTED if ext != ".parquet"]
REWARD_SLOTS = 3
PLAN_TIMEOUT_S = 10  # an unknown hub id offline retries for ~25 s; do not hold the page that long
PREVIEW_TIMEOUT_S = 30  # a hub dataset preview downloads it
NOT_IN_FORM = ("rewards", "output_dir")

# Keys with their own typed widget at the top of the form (the rest are YAML text fields).
FORM_TYPED = ["model_name_or_path", "dataset", "prompt_column", "answer_column", "num_generations",
              "max_prompt_length", "max_completion_length", "learning_rate", "max_steps", "lora_r",
              "beta", "loss_type", "vram_gb"]
CHUNK_KEYS = ("generation_chunk_size", "micro_batch_size", "logprob_chunk_size")

# Lookups that may go to the network (a model's config, a hub dataset) run here, with a timeout.
_background = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="lookup")


_HINTS = typing.get_type_hints(TrainConfig)
CONFIG_KEYS = [key for _, keys in key_groups() for key in keys if key not in NOT_IN_FORM]
TEXT_KEYS = [key for key in CONFIG_KEYS if key not in FORM_TYPED]
REWARD_FIELDS = [f"{kind}_{i}" for i in range(1, REWARD_SLOTS + 1) for kind in ("reward", "weight")]
# The form, in the order the /check and /start endpoints take their inputs.
FORM_KEYS = ["preset", *CONFIG_KEYS, *REWARD_FIELDS, "run_name"]
# Fields that show their own error message under them.
ERROR_FIELDS = ["preset", *CONFIG_KEYS, *(f"reward_{i}" for i in range(1, REWARD_SLOTS + 1)), "run_name", "general"]


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


# --- values <-> form ---------------------------------------------------------------------------


def _text_only(key: str) -> bool:
    """Keys whose text is taken as typed (a system prompt "yes" stays the word yes)."""
    hint = _HINTS[key]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return all(option in (str, type(None)) for option in options)


def to_text(value: Any) -> str:
    """A config value as the text field shows it (YAML the form reads back)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # numbers, booleans and lists: valid YAML too


def from_text(key: str, text: Any) -> Any:
    """A text field's value for the config (see to_text); typed widgets pass through."""
    if not isinstance(text, str):
        return text
    if _text_only(key):
        return text if text.strip() else None
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the config check then names the key and what it expects


def config_to_form(values: dict[str, Any], preset: str = "", run_name: str = "") -> dict[str, Any]:
    """The form's values for a config mapping (a preset's, or a run's config.yaml to clone)."""
    form: dict[str, Any] = {"preset": preset, "run_name": run_name}
    for key in CONFIG_KEYS:
        value = values.get(key)
        form[key] = value if key in FORM_TYPED and not isinstance(value, (list, dict)) else to_text(value)
    form["answer_column"] = values.get("answer_column") or ""
    form["learning_rate"] = f"{values['learning_rate']:g}"
    rewards = values.get("rewards") or []
    for i in range(1, REWARD_SLOTS + 1):
        spec = rewards[i - 1] if i <= len(rewards) else None
        spec = {"name": spec, "weight": 1.0} if isinstance(spec, str) else spec
        form[f"reward_{i}"] = spec["name"] if spec else ""
        form[f"weight_{i}"] = spec.get("weight", 1.0) if spec else 1.0
    return form


def preset_form_values(preset: str | None) -> dict[str, Any]:
    """The form's values for a preset (its YAML over the defaults); run_name is left empty."""
    values = TrainConfig().to_dict()
    if preset:
        values.update(build_config(read_yaml(preset_path(preset))).to_dict())
    return config_to_form(values, preset or "")


def clone_form_values(config_file: Path) -> dict[str, Any]:
    """The form's values for a run's config.yaml, to start a similar run (under a new name)."""
    return config_to_form(build_config(read_yaml(config_file)).to_dict())


# --- form -> config ----------------------------------------------------------------------------


def source_kind(source: str) -> str:
    """"builtin", "local" (a file or folder on the server) or "hub"."""
    if source.startswith("builtin:"):
        return "builtin"
    return "local" if Path(source).expanduser().exists() or _looks_like_path(source) else "hub"


def inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def safe_run_name(name: str) -> str:
    name = (name or "").strip()
    return name or time.strftime("run-%Y%m%d-%H%M%S")


def field_of(key: str | None) -> str:
    """The form field that shows an error about config key `key`."""
    if key == "rewards":
        return "reward_1"
    return key if key in ERROR_FIELDS else "general"


def form_values(form: dict[str, Any]) -> dict[str, Any]:
    """The config mapping a form describes (rewards and output_dir aside), typed as the config
    check wants it. Keys a (script's) form leaves out come from its preset, else the defaults."""
    values: dict[str, Any] = {}
    missing = [key for key in CONFIG_KEYS if key not in form]
    if missing:
        try:
            base = preset_form_values(form.get("preset") or None)
        except ConfigError:  # reported at the preset field
            base = preset_form_values(None)
        form = {**{key: base[key] for key in missing}, **form}
    for key in CONFIG_KEYS:
        value = form.get(key)
        values[key] = from_text(key, value.strip() if isinstance(value, str) and key in FORM_TYPED else value)
    values["answer_column"] = values["answer_column"] or None
    # The page's number field cannot be empty: it sends 0, which means "not set" (0 GB plans nothing).
    values["vram_gb"] = values["vram_gb"] or None
    return values


def form_to_config(form: dict[str, Any], ctx: AppContext, check_data: bool = True,
                   check_model: bool = True) -> tuple[TrainConfig | None, dict[str, str]]:
    """Build and validate the TrainConfig the form describes: (config, {}) or (None, errors),
    where errors maps a form field (or "general") to its message. All fields are checked, not
    just the first bad one, so every problem shows next to its field at once."""
    errors: dict[str, str] = {}
    values = form_values(form)
    if form.get("preset"):
        try:
            preset_path(form["preset"])
        except ConfigError as err:
            errors["preset"] = str(err)
    for key in ("model_name_or_path", "dataset", "prompt_column"):
        if not values[key]:
            errors[key] = f"{key}: required"
    rewards = []
    for i in range(1, REWARD_SLOTS + 1):
        name, weight = (form.get(f"reward_{i}") or "").strip(), form.get(f"weight_{i}")
        if not name:
            continue
        problem = reward_problem(name, ctx)
        if problem:
            errors[f"reward_{i}"] = problem
        elif not isinstance(weight, (int, float)) or isinstance(weight, bool):
            errors[f"reward_{i}"] = f"reward {name}: give a weight (a number such as 1.0)"
        else:
            rewards.append({"name": name, "weight": float(weight)})
    if not rewards and not any(k.startswith("reward_") for k in errors):
        errors["reward_1"] = "rewards: pick at least one reward function"
    if rewards:
        values["rewards"] = rewards

    for key in ("tools", "environment_factory"):
        problem = tool_problem(key, values.get(key), ctx)
        if problem:
            errors[key] = problem

    run_name = safe_run_name(form.get("run_name") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", run_name):
        errors["run_name"] = "run name: letters, digits, '.', '_' and '-' only (at most 64)"
    elif (ctx.runs_dir / run_name).exists():
        errors["run_name"] = f"run '{run_name}' already exists: resume it on the Train tab, or choose another name"
    values["output_dir"] = str((ctx.runs_dir / run_name).resolve())

    source = values["dataset"] or ""
    if source and source_kind(source) == "local":
        path = Path(source).expanduser()
        if not ctx.allow_local_paths and not inside(path, ctx.work_dir / "uploads"):
            errors["dataset"] = ("dataset: this app is shared, so it only reads uploaded files: upload the "
                                 "dataset, or give a built-in or hub dataset id")
        else:
            values["dataset"] = str(path.resolve())

    config = None
    while True:  # collect one error per field: drop the bad key and check the rest again
        try:
            config = build_config(values)
            break
        except ConfigError as err:
            errors.setdefault(field_of(err.key), str(err))
            if err.key not in values:
                break
            values.pop(err.key)
    if errors:
        return None, errors
    if check_data and source_kind(config.dataset) != "hub":
        try:  # columns and every row, without a tokenizer (the length check needs the model)
            load_prompt_data(config)
        except DatasetError as err:
            errors[field_of(err.key)] = str(err)
    if check_model and not errors:
        try:  # a hub model that is not downloaded while offline would fail only after Start
            check_model_available(config.model_name_or_path)
            problem = missing_weights(config.model_name_or_path)
        except ModelLoadError as err:
            problem = str(err)
        if problem:
            errors["model_name_or_path"] = problem
    return (None, errors) if errors else (config, {})


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def missing_weights(name: str) -> str | None:
    """Offline, a hub model whose config.json is in the cache but whose weights are not passes
    check_model_available, and Start would fail only when the weights load: say so now."""
    from huggingface_hub import constants, try_to_load_from_cache

    if name.startswith("builtin:") or Path(name).expanduser().exists() or not constants.HF_HUB_OFFLINE:
        return None
    if any(isinstance(try_to_load_from_cache(name, f), str) for f in WEIGHT_FILES):
        return None
    return (f"model_name_or_path: {name}'s weights are not downloaded (only its config is in the cache) and the "
            f"Hub is offline (HF_HUB_OFFLINE); run `hf download {name}` where there is a connection, or pick "
            "another model")


def reward_problem(name: str, ctx: AppContext) -> str | None:
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


def tool_problem(key: str, value: Any, ctx: AppContext) -> str | None:
    """Tools and environments are code that runs in the trainer: the package's own (the
    sandboxed python tool, lowvram_grpo.* functions) is offered as rewards are; anyone else's
    only with --allow-custom-code. The python tool runs the model's code: like code_tests, only
    with --allow-code-execution."""
    names = value if isinstance(value, list) else [value] if value else []
    for name in names:
        name = str(name)
        if name == "python":
            if not ctx.allow_code_execution:
                return ("tools: the python tool runs the model's code on this machine (sandboxed); start the app "
                        "with --allow-code-execution to offer it")
        elif not name.startswith("lowvram_grpo.") and not ctx.allow_custom_code:
            return (f"{key}: '{name}' is your own code; start the app with --allow-custom-code to use your own "
                    "tools and environments")
    return None


def reward_functions_in_file(path: Path) -> list[str]:
    """Top-level function names of a Python file, read without running it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=path.name)
    except (SyntaxError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{path.name} is not valid Python: {err}") from None
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]


# --- what Start will run -----------------------------------------------------------------------


def config_yaml(config: TrainConfig) -> str:
    """config.yaml exactly as Start writes it into the run directory."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def cli_command(config: TrainConfig) -> str:
    """The same run from a terminal: the config file Start writes, then train."""
    return f"lowvram-grpo train --config {shlex.quote(str(Path(config.output_dir) / 'config.yaml'))}"


def memory_plan(config: TrainConfig) -> tuple[str, str]:
    """(headline, full plan) for the config as the run will use it on `vram_gb`: fixed chunk
    sizes are the ones estimated, "auto" ones are the planner's choice, which the run makes
    for the same vram_gb. Never raises."""
    vram_gb = config.vram_gb
    if not vram_gb:
        return "", "Give the GPU memory (GB) to plan for."

    def compute():
        from lowvram_grpo.planning.planner import plan

        return plan(config, float(vram_gb))

    try:
        p = _background.submit(compute).result(timeout=PLAN_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        return "", (f"No memory plan: finding the config of '{config.model_name_or_path}' took more than "
                    f"{PLAN_TIMEOUT_S} s (offline?). A local directory or a shipped architecture name works offline.")
    except Exception as err:  # the planner is an estimate: its failure must never break the page
        return "", f"No memory plan: {err}"
    from lowvram_grpo.planning.planner import format_plan

    return plan_headline(p), format_plan(p)


def plan_headline(p) -> str:
    """What this run's own chunk sizes need, against the card: the run uses these, so the
    headline must describe them (not the planner's choice for settings the run will not use)."""
    used = p.configured
    settings = used.settings
    chunks = ", ".join(f"{k}={settings[k]}" for k in CHUNK_KEYS)
    verdict = "fits" if used.total_bytes <= p.usable_gb * 2**30 else "does NOT fit"
    needs = f"{used.total_gb:.{1 if used.total_gb >= 1 else 2}f}"
    return f"**This run needs ~{needs} GB of {p.vram_gb:g} GB: {verdict}** ({chunks})"


# --- uploads -----------------------------------------------------------------------------------


def save_upload(uploaded: str, dest_dir: Path, suffixes: list[str], upload_root: Path) -> Path:
    """Copy a file the web server received into `dest_dir` under a safe name. The path must be
    inside the server's own upload folder `upload_root`: a path a client made up is refused."""
    src = Path(uploaded).resolve()
    if not inside(src, upload_root) or not src.is_file():
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


def merge_destination(text: str, ctx: AppContext) -> Path:
    """Where the merged model goes: a relative path is under the app's exports/ folder; any other
    path only in a local app (a shared one writes nowhere else on the server). Raises ValueError
    with the page's one-line message; an existing non-empty directory is never overwritten."""
    exports = ctx.subdir("exports")
    if not (text or "").strip():
        raise ValueError(f"give a directory for the merged model, e.g. my-model (saved under {exports})")
    dest = (exports / Path(text.strip()).expanduser()).resolve()  # an absolute path stays itself
    if not ctx.allow_local_paths and not inside(dest, exports):
        raise ValueError(f"this app is shared, so it saves only under {exports}: give a directory name such as "
                         "my-model")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} is a file: give a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise ValueError(f"{dest} already exists and is not empty: choose another directory (nothing is overwritten)")
    return dest


def preview_rows(source: str, n: int = 5) -> tuple[list[str], list[list[str]]]:
    """Columns and first rows of a dataset as text, an image column's images as markdown
    thumbnails (or the one-line reason one cannot be read); raises DatasetError (also for a
    slow hub download)."""
    try:
        columns, rows = _background.submit(preview, source, n).result(timeout=PREVIEW_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise DatasetError(f"{source}: no answer within {PREVIEW_TIMEOUT_S} s (offline?)") from None
    text = lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)  # noqa: E731
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else Path.cwd()

    def cell(row: dict, column: str) -> str:
        if column not in vision.IMAGE_COLUMNS or row.get(column) is None:
            return text(row.get(column))
        try:
            images = vision.row_images({column: row[column]})
            return vision.thumbnails_markdown([vision.thumbnail(vision.load_image(v, folder)) for v in images])
        except DatasetError as err:
            return f"⚠ {err}"

    return columns, [[cell(row, c) for c in columns] for row in rows]


def preview_datatypes(columns: list[str]) -> list[str]:
    """How the preview table shows each column: images as thumbnails, the rest as plain text."""
    return ["markdown" if c in vision.IMAGE_COLUMNS else "str" for c in columns]
