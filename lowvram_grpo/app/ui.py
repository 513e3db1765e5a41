"""The web app: set up a GRPO run, start it, watch it, compare runs, browse completions, try
rewards, use the adapter (`lowvram-grpo ui`). This module is the page's layout and wiring only:
what each event does is in handlers.py, the form in setup.py, what is shown about runs
in dashboard.py, the curves' drawing in ui_curves.js.

The page never trains in its own process. Start writes the resolved config into the run
directory and launches the CLI trainer as a subprocess (see `jobs.py`); from then on the page
only reads the run directory every two seconds. A crash or an out-of-memory kill in training
cannot take the page down, and a reloaded page (or a restarted app) finds the job again.

Layout of the app's work directory (`--work-dir`, default `runs/app`):

    job.json      the current job: pid, run directory, command
    runs/<name>/  one run directory per run (config.yaml, status.json, metrics.jsonl, train.log, ...)
    uploads/      uploaded datasets (copied here; the browser's file names are never used as paths)
    rewards/      uploaded reward files (only with --allow-custom-code)
    exports/      adapter zips offered for download; merged models saved under a name

Safety: the app listens on 127.0.0.1 unless --host or --share say otherwise; --auth-file (or
--auth, or $LOWVRAM_GRPO_AUTH) adds a login. Reward functions are Python code, so uploading them (or naming any reward that is
not a built-in) is refused unless the app was started with --allow-custom-code. The code_tests
reward runs the model's code (in the sandbox, see rewards/sandbox.py): only with --allow-code-execution.
Reward models and judge:self run nobody's code; a judge URL only in a local app. Datasets on the
server's disk can be named by path only when the app is local (127.0.0.1, no --share); otherwise
only uploads, built-ins and hub ids are accepted.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from lowvram_grpo.app import dashboard
from lowvram_grpo.app.handlers import EVAL_COLUMNS, EXAMPLE_COLUMNS, Handlers
from lowvram_grpo.app.jobs import JobManager
from lowvram_grpo.app.setup import (
    DATASET_SUFFIXES,
    ERROR_FIELDS,
    FORM_KEYS,
    MAX_UPLOAD_MB,
    REWARD_FIELDS,
    REWARD_SLOTS,
    TEXT_KEYS,
    AppContext,
    preset_form_values,
)
from lowvram_grpo.app.try_rewards import MAX_SAMPLE_ROWS
from lowvram_grpo.config import LOSS_TYPES, SCALE_REWARDS, list_presets
from lowvram_grpo.config_docs import key_groups, key_help
from lowvram_grpo.export import DTYPES
from lowvram_grpo.rewards.builtins import BUILTIN_REWARDS

logger = logging.getLogger(__name__)
DEFAULT_WORK_DIR = "runs/app"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
REFRESH_EVERY_S = 2.0
CURVES_JS = (Path(__file__).with_name("ui_curves.js")).read_text(encoding="utf-8")
# Keeps the log's <pre> scrolled to its end, so a traceback's last lines are in view.
LOG_JS = """const end = () => { const pre = element.querySelector('pre'); if (pre) pre.scrollTop = pre.scrollHeight; };
end(); watch('value', end);"""

# Help text and other subdued text at >= 4.5:1 on white (WCAG AA); gradio's default is ~1.9:1.
THEME = gr.themes.Default().set(body_text_color_subdued="*neutral_600", block_info_text_color="*neutral_600",
                                input_placeholder_color="*neutral_500", block_label_text_color="*neutral_700")

CSS = """
.field-error { color: #b91c1c !important; }
.field-error p { margin: 0; font-size: var(--text-md); }
/* the field an error belongs to is marked too, not only its message (a hidden message is not in
   the page, so this matches only while it shows; gradio wraps each field in a .form) */
.form:has(+ .field-error) > .block, .block:has(+ .field-error) { box-shadow: 0 0 0 2px #b91c1c !important; }
.run-status { padding: 6px 0; }
.run-error { color: #b91c1c; white-space: pre-wrap; }
#health { color: #92400e; }
pre.log { max-height: 16em; overflow: auto; font-size: 12px; background: #f6f6f7; padding: 6px; margin: 0;
          white-space: pre-wrap; color: #1f2937; }
#curve-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
#curve-grid figure { margin: 0; position: relative; min-width: 0; border: 1px solid #e5e7eb; border-radius: 6px;
                     padding: 4px 6px; }
#curve-grid figcaption { font-weight: 600; font-size: 14px; color: #1f2937; }
#curve-grid svg { width: 100%; height: auto; display: block; }
#curve-grid svg .line { fill: none; stroke-width: 1.8; }
#curve-grid svg .band { opacity: 0.18; stroke: none; }
#curve-grid svg .grid { stroke: #e5e7eb; }
#curve-grid svg .cursor { stroke: #6b7280; stroke-dasharray: 3 3; }
#curve-grid svg .tick { font-size: 11px; fill: #4b5563; }
#curve-grid .legend { display: flex; flex-wrap: wrap; gap: 2px 12px; font-size: 12px; color: #1f2937; }
#curve-grid .legend i { display: inline-block; width: 12px; height: 3px; margin: 0 4px 3px 0; vertical-align: middle; }
#curve-grid .tip { position: absolute; top: 28px; background: #fff; border: 1px solid #9ca3af; padding: 4px 6px;
                   font-size: 12px; color: #111827; pointer-events: none; z-index: 5; white-space: nowrap; }
#curve-grid .empty { color: #4b5563; }
/* narrow screens: rows stack */
@media (max-width: 640px) {
  .row { flex-direction: column !important; }
  .row > * { width: 100% !important; min-width: 0 !important; }
}
"""


def _named_inputs(fn, names: list[str]):
    """Give a `*values` handler named parameters, so the API (gradio_client) shows and accepts
    the form's field names: client.predict(preset="tiny-cpu", ..., api_name="/start")."""

    if inspect.isgeneratorfunction(fn):  # gradio streams a generator's updates only if it sees one
        def wrapper(*values):
            yield from fn(*values)
    else:
        def wrapper(*values):
            return fn(*values)

    wrapper.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])
    wrapper.__name__ = fn.__name__
    return wrapper


LABELS = {"num_generations": "G (completions per prompt)", "max_prompt_length": "Max prompt tokens",
          "max_completion_length": "Max completion tokens", "max_steps": "Steps", "lora_r": "LoRA rank",
          "learning_rate": "Learning rate", "beta": "beta (KL weight)", "loss_type": "Loss type"}


def build_app(work_dir: str | Path = DEFAULT_WORK_DIR, allow_custom_code: bool = False,
              allow_local_paths: bool = True, allow_code_execution: bool = False) -> gr.Blocks:
    ctx = AppContext(Path(work_dir).resolve(), allow_custom_code, allow_local_paths, allow_code_execution)
    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = JobManager(ctx.work_dir)
    on = Handlers(ctx, jobs)

    with gr.Blocks(title="lowvram-grpo", analytics_enabled=False) as demo:
        gr.Markdown("# lowvram-grpo\nGRPO fine-tuning on one GPU: set up a run, start it, watch the reward "
                    "climb, use the adapter. Training runs in its own process; this page reads its run "
                    f"directory under `{ctx.runs_dir}`.")
        with gr.Tabs(overflow_behavior="wrap") as tabs:  # every tab name stays visible on a phone
            with gr.Tab("Set up", id="setup"):
                setup = _setup_tab(ctx)
            with gr.Tab("Train and watch", id="watch"):
                watch = _watch_tab(on)
            with gr.Tab("Runs", id="runs"):
                runs = _runs_tab(on)
            with gr.Tab("Completions", id="completions"):
                completions = _completions_tab()
            with gr.Tab("Try rewards", id="try-rewards"):
                workbench = _workbench_tab()
            with gr.Tab("Use the adapter", id="use"):
                use = _use_tab(ctx, on)

        # Every tab's components by name, for the wiring (the names are unique across tabs).
        page = SimpleNamespace(demo=demo, tabs=tabs, timer=gr.Timer(REFRESH_EVERY_S),
                               sent=gr.State({}),  # rows of each run's curves this page already has
                               form_inputs=[setup.fields[k] for k in FORM_KEYS],
                               error_outputs=[setup.errors[k] for k in ERROR_FIELDS],
                               **vars(setup), **vars(watch), **vars(runs), **vars(completions), **vars(workbench),
                               **vars(use))
        _wire_setup_and_watch(on, page)
        _wire_other_tabs(on, page)
    demo.jobs = jobs  # for tests and shutdown hooks
    demo.app_context = ctx
    demo.handlers = on
    return demo


def _setup_tab(ctx: AppContext) -> SimpleNamespace:
    """Set up: the form (every config key), the dataset preview, the memory plan and Start."""
    presets = list_presets()
    initial = preset_form_values("tiny-cpu" if "tiny-cpu" in presets else None)
    builtin_rewards = [""] + sorted(n for n in BUILTIN_REWARDS if n != "code_tests" or ctx.allow_code_execution) \
        + ["judge:self"]
    allow_custom_code = ctx.allow_custom_code
    fields: dict[str, gr.components.Component] = {}
    errors: dict[str, gr.Markdown] = {}

    def form_field(key: str, component):
        fields[key] = component
        component.elem_id = component.elem_id or f"field-{key}"
        if key in ERROR_FIELDS:
            errors[key] = gr.Markdown(visible=False, elem_classes=["field-error"], elem_id=f"error-{key}")
        return component

    with gr.Row():
        with gr.Column():
            form_field("preset", gr.Dropdown(["", *presets], value=initial["preset"], label="Preset",
                                             info="fills the form; change any setting after"))
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
    preview_message = gr.Markdown(elem_id="preview-message")
    preview_df = gr.Dataframe(label="First rows", interactive=False, max_height=220,
                              elem_id="preview")

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
                "runs in the sandbox on this machine." if ctx.allow_code_execution else
                "Code execution (`code_tests`) is off: start the app with `--allow-code-execution` "
                "to reward code by running it against the dataset's tests.")
    for i in range(1, REWARD_SLOTS + 1):
        with gr.Row():
            with gr.Column(scale=3):
                form_field(f"reward_{i}", gr.Dropdown(builtin_rewards, value=initial[f"reward_{i}"],
                                                      label=f"Reward {i}",
                                                      allow_custom_value=allow_custom_code))
            with gr.Column(scale=1):
                fields[f"weight_{i}"] = gr.Number(initial[f"weight_{i}"], label="weight")

    gr.Markdown("### Hyperparameters")
    with gr.Row():
        for key in ("num_generations", "max_prompt_length", "max_completion_length", "max_steps",
                    "lora_r"):
            with gr.Column(min_width=140):
                form_field(key, gr.Number(initial[key], label=LABELS[key], precision=0))
    with gr.Row():
        with gr.Column(min_width=140):
            form_field("learning_rate", gr.Textbox(initial["learning_rate"], label=LABELS["learning_rate"]))
        with gr.Column(min_width=140):
            form_field("beta", gr.Number(initial["beta"], label=LABELS["beta"]))
        with gr.Column(min_width=140):
            form_field("loss_type", gr.Dropdown(list(LOSS_TYPES), value=initial["loss_type"],
                                                label=LABELS["loss_type"]))
        with gr.Column(min_width=140):
            form_field("run_name", gr.Textbox("", label="Run name", placeholder="automatic"))

    gr.Markdown("### All settings\nEvery config key, with the groups and help of `lowvram-grpo keys`; "
                "values are YAML (`0.9`, `null`, `[q_proj, v_proj]`, `auto`). Empty means null.")
    for title, keys in key_groups():
        shown = [k for k in keys if k in TEXT_KEYS]
        if not shown:
            continue
        with gr.Accordion(title[0].upper() + title[1:], open=False, elem_id=f"group-{title.split()[0]}"):
            with gr.Row():
                for key in shown:
                    with gr.Column(min_width=200):
                        form_field(key, gr.Textbox(initial[key], label=key, info=key_help(key),
                                                   lines=2 if key in ("system_prompt", "prompt_template")
                                                   else 1))

    gr.Markdown("### Memory and what Start runs")
    with gr.Row():
        form_field("vram_gb", gr.Number(initial["vram_gb"], label="GPU memory (GB)", minimum=0,
                                        info="plans the memory, and sizes the chunk sizes set to auto; "
                                             "empty = what the GPU has free at start"))
        check_button = gr.Button("Check settings and memory", elem_id="check")
    errors["general"] = gr.Markdown(visible=False, elem_classes=["field-error"],
                                    elem_id="error-general")
    plan_summary = gr.Markdown(elem_id="plan-summary")
    plan_box = gr.Code(label="Memory plan", language=None, interactive=False, visible=False)
    command_box = gr.Code(label="The same run from a terminal, and its config.yaml", language="yaml",
                          interactive=False, visible=False, elem_id="command")
    check_message = gr.Markdown(elem_id="check-message")
    start_button = gr.Button("Start training", variant="primary", elem_id="start")
    start_message = gr.Markdown(elem_id="start-message")
    return SimpleNamespace(
        fields=fields, errors=errors, builtin_rewards=builtin_rewards, dataset_file=dataset_file,
        preview_button=preview_button, preview_message=preview_message, preview_df=preview_df,
        reward_file=reward_file, reward_message=reward_message if allow_custom_code else None,
        check_button=check_button, plan_summary=plan_summary, plan_box=plan_box, command_box=command_box,
        check_message=check_message, start_button=start_button, start_message=start_message)


def _watch_tab(on: Handlers) -> SimpleNamespace:
    """Train and watch: the run's status, health, curves, checkpoints and log; stop, resume, more steps."""
    with gr.Row():
        # Any value is accepted here and checked by Handlers.run_dir: the choices change.
        run_choice = gr.Dropdown(on.runs(), label="Run", scale=3, elem_id="run-choice",
                                 allow_custom_value=True)
        compare = gr.Dropdown(on.runs(), multiselect=True, label="Compare with (overlay)", scale=3,
                              elem_id="compare", allow_custom_value=True)
        smoothing = gr.Slider(0, 0.99, value=0, step=0.01, label="Smoothing", scale=2,
                              elem_id="smoothing")
    with gr.Row():
        stop_button = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="stop",
                                interactive=False)
        resume_button = gr.Button("Resume", elem_id="resume", interactive=False)
        extra_steps = gr.Number(100, label="More steps", precision=0, minimum=1, min_width=100,
                                elem_id="extra-steps")
        more_button = gr.Button("Continue for more steps", elem_id="more-steps", interactive=False)
    job_message = gr.Markdown(elem_id="job-message")
    status_box = gr.HTML(elem_id="run-status")
    health_box = gr.Markdown(elem_id="health")
    curve_data = gr.HTML("", html_template="<i data-curves></i>", js_on_load=CURVES_JS, visible="hidden",
                         elem_id="curve-data")
    gr.HTML("<div id='curve-grid'></div>", js_on_load=None, elem_id="curves")
    checkpoints_box = gr.Markdown(elem_id="checkpoints")
    log_box = gr.HTML("<pre class='log'>(no log yet)</pre>", js_on_load=LOG_JS,
                      label="Log (train.log)", elem_id="log")
    return SimpleNamespace(
        run_choice=run_choice, compare=compare, smoothing=smoothing, stop_button=stop_button,
        resume_button=resume_button, extra_steps=extra_steps, more_button=more_button, job_message=job_message,
        status_box=status_box, health_box=health_box, curve_data=curve_data, checkpoints_box=checkpoints_box,
        log_box=log_box)


def _runs_tab(on: Handlers) -> SimpleNamespace:
    """Runs: every run in a table; copy a run's settings, delete a run."""
    runs_df = gr.Dataframe(label="Runs", headers=dashboard.RUN_TABLE_COLUMNS, interactive=False,
                           elem_id="runs-table")
    with gr.Row():
        runs_refresh = gr.Button("Refresh", size="sm")
        table_run = gr.Dropdown(on.runs(), label="Run", allow_custom_value=True, elem_id="table-run")
        clone_button = gr.Button("Copy its settings into Set up", elem_id="clone")
        confirm_delete = gr.Checkbox(False, label="yes, delete it", elem_id="confirm-delete")
        delete_button = gr.Button("Delete run", variant="stop", elem_id="delete")
    runs_message = gr.Markdown(elem_id="runs-message")
    return SimpleNamespace(runs_df=runs_df, runs_refresh=runs_refresh, table_run=table_run, clone_button=clone_button,
                           confirm_delete=confirm_delete, delete_button=delete_button, runs_message=runs_message)


def _completions_tab() -> SimpleNamespace:
    """Completions: the logged completions of the watched run, filtered."""
    with gr.Row():
        # Text, not gr.Number: an empty number field arrives as 0, which would filter.
        step_from = gr.Textbox(label="From step", placeholder="first", min_width=100)
        step_to = gr.Textbox(label="To step", placeholder="last", min_width=100)
        min_reward = gr.Textbox(label="Reward at least", placeholder="any", min_width=100)
        function = gr.Dropdown([""], value="", label="Reward function (reward filter applies to it)",
                               allow_custom_value=True, elem_id="completion-function")
        text_filter = gr.Textbox(label="Text contains", elem_id="completion-text")
    browse_button = gr.Button("Show", elem_id="browse")
    browse_message = gr.Markdown(elem_id="browse-message")
    completions_df = gr.Dataframe(label="Logged completions (completions.jsonl), newest first",
                                  headers=dashboard.COMPLETION_COLUMNS, datatype=dashboard.COMPLETION_DATATYPES,
                                  interactive=False, wrap=True, max_height=600, elem_id="completions")
    # Multi-turn completions (runs with tools) as turns: model text, tool calls, tool results.
    trajectories = gr.HTML(elem_id="trajectories")
    return SimpleNamespace(step_from=step_from, step_to=step_to, min_reward=min_reward, function=function,
                           text_filter=text_filter, browse_button=browse_button, browse_message=browse_message,
                           completions_df=completions_df, trajectories=trajectories)


def _workbench_tab() -> SimpleNamespace:
    """Try rewards: pasted or the base model's completions scored as groups."""
    gr.Markdown("Score completions with the reward functions chosen on **Set up**, as GRPO groups: "
                "per-function rewards, the weighted total and each completion's advantage, before "
                "any training. Paste completions (no model, no GPU), or sample the base model's own.")
    with gr.Row():
        wb_prompt = gr.Textbox(label="Prompt", value="3+5=", elem_id="wb-prompt")
        wb_answer = gr.Textbox(label="Answer (the answer column's value)", value="8", elem_id="wb-answer")
        wb_scale = gr.Dropdown(list(SCALE_REWARDS), value="group", label="scale_rewards")
    wb_image = gr.Image(type="pil", label="Image (optional: reward functions get it as `images`)",
                        height=160, elem_id="wb-image")
    wb_completions = gr.Textbox(label="Completions, separated by lines of ---", lines=8,
                                value="8\n---\n9\n---\nThe answer is 8\n---\n", elem_id="wb-completions")
    wb_button = gr.Button("Score", variant="primary", elem_id="wb-score")
    wb_message = gr.Markdown(elem_id="wb-message")
    wb_table = gr.Dataframe(label="Rewards and advantages", headers=["completion", "total", "advantage"],
                            interactive=False, wrap=True,
                            elem_id="wb-table")
    gr.Markdown("**The base model's completions**: the model, dataset, rewards and generation settings "
                "of **Set up** (G completions per row, no adapter), for the dataset's first rows. The "
                "model loads into this app's process on the first click and stays for the next.")
    with gr.Row():
        wb_rows = gr.Number(2, label="Rows (from the dataset's start)", precision=0, minimum=1,
                            maximum=MAX_SAMPLE_ROWS, elem_id="wb-rows")
        wb_sample_button = gr.Button("Sample the base model and score", elem_id="wb-sample")
    wb_sample_message = gr.Markdown(elem_id="wb-sample-message")
    wb_sample_table = gr.Dataframe(label="The base model's groups: rewards and advantages",
                                   headers=["row", "prompt", "answer", "completion", "total", "advantage"],
                                   interactive=False, wrap=True, max_height=600, elem_id="wb-sample-table")
    return SimpleNamespace(wb_prompt=wb_prompt, wb_answer=wb_answer, wb_scale=wb_scale, wb_image=wb_image,
                           wb_completions=wb_completions,
                           wb_button=wb_button, wb_message=wb_message, wb_table=wb_table, wb_rows=wb_rows,
                           wb_sample_button=wb_sample_button, wb_sample_message=wb_sample_message,
                           wb_sample_table=wb_sample_table)


def _use_tab(ctx: AppContext, on: Handlers) -> SimpleNamespace:
    """Use the adapter: zip it, try it, evaluate it against the base model, merge it."""
    with gr.Row():
        use_run = gr.Dropdown(on.runs(), label="Run", allow_custom_value=True, elem_id="use-run")
        use_adapter = gr.Dropdown([], label="Adapter (checkpoint or final)", allow_custom_value=True,
                                  elem_id="use-adapter")
    with gr.Row():
        zip_button = gr.Button("Zip the adapter for download")
        adapter_file = gr.File(label="Adapter (PEFT format)", interactive=False)
    gr.Markdown("**Try it**: greedy generation with the adapter off (the base model) and on. The model "
                "loads into this app's process the first time you ask.")
    try_prompt = gr.Textbox(label="Prompt", placeholder="3+5=")
    try_image = gr.Image(type="pil", label="Image (optional, for image-text models: shown before the prompt)",
                         height=160, elem_id="try-image")
    try_tokens = gr.Number(32, label="Max new tokens", precision=0, minimum=1, maximum=2048)
    try_button = gr.Button("Generate")
    with gr.Row():
        base_out = gr.Textbox(label="Base model (adapter off)", interactive=False)
        tuned_out = gr.Textbox(label="With the adapter", interactive=False)
    use_message = gr.Markdown()

    gr.Markdown("### Base model vs adapter on held-out prompts\nGreedy answers of the base model "
                "(adapter off) and with the adapter, scored with the run's rewards, on the run's eval "
                "split (`eval_fraction` or `eval_dataset`; without one, its first training prompts).")
    with gr.Row():
        eval_prompts = gr.Number(20, label="Prompts (at most)", precision=0, minimum=1,
                                 elem_id="eval-prompts")
        eval_button = gr.Button("Evaluate", elem_id="eval")
    eval_message = gr.Markdown(elem_id="eval-message")
    eval_table = gr.Dataframe(label="Metrics", headers=EVAL_COLUMNS, interactive=False,
                              elem_id="eval-table")
    eval_examples = gr.Dataframe(label="Examples", headers=EXAMPLE_COLUMNS, interactive=False, wrap=True,
                                 elem_id="eval-examples")

    gr.Markdown("### Merge into the base model\nA standalone model (transformers format, 16-bit, "
                "merged on the CPU) for vLLM, TGI, SGLang or a GGUF conversion.")
    with gr.Row():
        merge_dir = gr.Textbox(label="Save to directory", placeholder="my-model",
                               info=f"a name is saved under {ctx.subdir('exports')}"
                                    + ("; an absolute path anywhere" if ctx.allow_local_paths else ""),
                               elem_id="merge-dir")
        merge_dtype = gr.Dropdown(list(DTYPES), value="float16", label="dtype", elem_id="merge-dtype")
        merge_button = gr.Button("Merge and save", elem_id="merge")
    merge_message = gr.Markdown(elem_id="merge-message")
    return SimpleNamespace(
        use_run=use_run, use_adapter=use_adapter, zip_button=zip_button, adapter_file=adapter_file,
        try_prompt=try_prompt, try_image=try_image, try_tokens=try_tokens, try_button=try_button, base_out=base_out,
        tuned_out=tuned_out,
        use_message=use_message, eval_prompts=eval_prompts, eval_button=eval_button, eval_message=eval_message,
        eval_table=eval_table, eval_examples=eval_examples, merge_dir=merge_dir, merge_dtype=merge_dtype,
        merge_button=merge_button, merge_message=merge_message)


def _wire_setup_and_watch(on: Handlers, p: SimpleNamespace) -> None:
    """The events of Set up and Train and watch, and the page's load (every event has an
    api_name, so gradio_client and scripts can drive it)."""
    fields = p.fields
    preview_io = ([fields["dataset"], fields["prompt_column"], fields["answer_column"]],
                  [p.preview_df, fields["prompt_column"], fields["answer_column"], p.preview_message])
    fields["preset"].input(on.load_preset, fields["preset"], [fields[k] for k in FORM_KEYS if k != "preset"]
                           + [p.errors["preset"]], api_name="load_preset").then(
        on.auto_preview, *preview_io, api_visibility="private")
    p.dataset_file.upload(on.upload_dataset, [p.dataset_file, fields["prompt_column"], fields["answer_column"]],
                          [fields["dataset"], p.preview_df, fields["prompt_column"], fields["answer_column"],
                           p.preview_message], api_name="upload_dataset")
    p.preview_button.click(on.preview, *preview_io, api_name="preview_dataset")
    if p.reward_file is not None:
        p.reward_file.upload(lambda file: on.upload_reward(file, p.builtin_rewards), p.reward_file,
                             [fields[f"reward_{i}"] for i in range(1, REWARD_SLOTS + 1)] + [p.reward_message],
                             api_name="upload_reward")
    p.check_button.click(_named_inputs(on.check, FORM_KEYS), p.form_inputs,
                         p.error_outputs + [p.check_message, p.plan_summary, p.plan_box, p.command_box],
                         api_name="check")
    p.start_button.click(_named_inputs(on.start, FORM_KEYS), p.form_inputs,
                         p.error_outputs + [p.start_message, p.run_choice, p.tabs], api_name="start",
                         concurrency_limit=1)

    p.stop_button.click(on.stop, None, p.job_message, api_name="stop")
    p.resume_button.click(on.resume, p.run_choice, p.job_message, api_name="resume", concurrency_limit=1)
    p.more_button.click(on.more_steps, [p.run_choice, p.extra_steps], p.job_message, api_name="more_steps",
                        concurrency_limit=1)
    watch_outputs = [p.status_box, p.health_box, p.curve_data, p.log_box, p.checkpoints_box, p.stop_button,
                     p.resume_button, p.more_button, p.sent]
    p.timer.tick(on.refresh, [p.run_choice, p.compare, p.sent], watch_outputs, api_name="refresh",
                 show_progress="hidden", concurrency_limit=None)
    for selector in (p.run_choice, p.compare):
        selector.change(on.refresh, [p.run_choice, p.compare, p.sent], watch_outputs, show_progress="hidden",
                        api_visibility="private")
    p.smoothing.change(None, p.smoothing, None, js="(v) => { window.lvgCurves && window.lvgCurves.setSmooth(v); }")
    use_selected = ([p.run_choice], [p.use_run, p.use_adapter])  # the Use tab follows the watched run
    p.run_choice.change(lambda name: (name, on.adapters(name)), *use_selected, api_visibility="private")
    p.use_run.change(on.adapters, p.use_run, p.use_adapter, api_name="adapters")
    # Checkpoints appear while a run trains: opening a tab lists the run's adapters as they are now.
    p.tabs.select(on.adapters, [p.use_run, p.use_adapter], p.use_adapter, api_visibility="private")

    loaded = p.demo.load(on.on_load, None, [p.run_choice, p.job_message, *p.form_inputs], api_name="on_load")
    loaded.then(on.auto_preview, *preview_io, api_visibility="private")
    # Also when the run selected on load is the one the page was built with (no change event).
    loaded.then(lambda name: (name, on.adapters(name)), *use_selected, api_visibility="private")


def _wire_other_tabs(on: Handlers, p: SimpleNamespace) -> None:
    """The events of Runs, Completions, Try rewards and Use the adapter."""
    runs_outputs = [p.runs_df, p.table_run, p.compare]
    p.runs_refresh.click(on.runs_table, None, runs_outputs, api_name="runs")
    p.tabs.select(on.runs_table, None, runs_outputs, api_visibility="private")
    p.clone_button.click(on.clone, p.table_run, [*p.form_inputs, p.runs_message, p.tabs], api_name="clone")
    p.delete_button.click(on.delete, [p.table_run, p.confirm_delete], p.runs_message, api_name="delete").then(
        on.runs_table, None, runs_outputs, api_visibility="private")

    browse_inputs = [p.run_choice, p.step_from, p.step_to, p.min_reward, p.function, p.text_filter]
    p.browse_button.click(on.completions, browse_inputs,
                          [p.completions_df, p.function, p.browse_message, p.trajectories], api_name="completions")

    p.wb_button.click(on.score_rewards, [*(p.fields[k] for k in REWARD_FIELDS), p.wb_prompt, p.wb_answer,
                                     p.wb_completions, p.wb_scale, p.wb_image], [p.wb_table, p.wb_message],
                      api_name="score_rewards")
    # Model work (sampling, try-it, eval, merge) runs one at a time: one GPU, one model in memory.
    model_work = {"concurrency_limit": 1, "concurrency_id": "model"}
    p.wb_sample_button.click(_named_inputs(on.score_base_model, [*FORM_KEYS, "num_rows"]),
                             [*p.form_inputs, p.wb_rows], [p.wb_sample_table, p.wb_sample_message],
                             api_name="score_base_model", **model_work)

    adapter = [p.use_run, p.use_adapter]
    p.zip_button.click(on.zip, adapter, [p.adapter_file, p.use_message], api_name="zip_adapter")
    p.try_button.click(on.try_it, [*adapter, p.try_prompt, p.try_tokens, p.try_image],
                       [p.base_out, p.tuned_out, p.use_message],
                       api_name="try_it", **model_work)
    p.eval_button.click(on.evaluate, [*adapter, p.eval_prompts], [p.eval_message, p.eval_table, p.eval_examples],
                        api_name="evaluate_adapter", **model_work)
    p.merge_button.click(on.merge, [*adapter, p.merge_dir, p.merge_dtype], p.merge_message,
                         api_name="merge_adapter", **model_work)


def launch(host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: list[tuple[str, str]] | None = None, allow_custom_code: bool = False,
           work_dir: str | Path = DEFAULT_WORK_DIR, prevent_thread_lock: bool = False, quiet: bool = False,
           allow_code_execution: bool = False):
    """Build the app and serve it; returns the Blocks (serving in the background with
    prevent_thread_lock=True). Local by default: --host, --share and --auth are explicit opt-ins."""
    local = host in LOCAL_HOSTS and not share
    if not local and auth is None:
        logger.warning("the app is reachable from other machines without a login; anyone who can open it can "
                       "start training and read its runs. Add --auth-file FILE (USER:PASS lines) or --auth user:pass.")
    demo = build_app(work_dir, allow_custom_code=allow_custom_code, allow_local_paths=local,
                     allow_code_execution=allow_code_execution)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=share, auth=auth,
                max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[str(demo.app_context.subdir("exports"))],
                prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True, css=CSS, theme=THEME,
                footer_links=["api"])
    running = demo.jobs.running()
    if running is not None and not prevent_thread_lock:  # the app was stopped (Ctrl-C), training was not
        print(f"training continues in the background (run {Path(running.run_dir).name}, pid {running.pid}); "
              "start the app again to watch or stop it", flush=True)
    return demo
