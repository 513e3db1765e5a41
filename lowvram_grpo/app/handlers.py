"""The app's event handlers: what each button, upload and refresh does, as plain methods.

ui.py lays out the page and wires each component to a method here; the methods take the
components' values and return their new values (gradio updates), so tests call them directly,
without a browser or a server. Gradio-free logic lives in setup.py (the form) and
dashboard.py (what is shown about runs).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils
import pandas as pd

from lowvram_grpo.app import dashboard, setup
from lowvram_grpo.app.jobs import LOG_NAME, JobError, JobManager, run_state, tail
from lowvram_grpo.app.setup import ERROR_FIELDS, FORM_KEYS, REWARD_SLOTS, AppContext
from lowvram_grpo.app.use_adapter import AdapterTryIt
from lowvram_grpo.config import ConfigError, RewardSpec
from lowvram_grpo.data import DatasetError
from lowvram_grpo.health import check_health
from lowvram_grpo.rundir import RunDir

LIKELY_PROMPT = ("prompt", "question", "problem", "instruction", "input", "query")
LIKELY_ANSWER = ("answer", "solution", "target", "label")
EXAMPLES_SHOWN = 5  # prompts of the eval shown with both answers
GPU_BUSY = "training is using the GPU: {what} when it has stopped or finished"

# Model work (eval, merge) runs here so that its handler can show progress notes meanwhile.
_model_work = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-work")


def error_updates(found: dict[str, str]) -> list:
    return [gr.update(value=f"⚠ {found[k]}" if k in found else "", visible=k in found) for k in ERROR_FIELDS]


def problems_markdown(found: dict[str, str], where: str = "") -> str:
    return f"**Fix {len(found)} problem{'s' * (len(found) > 1)}{where} first:**\n" + "\n".join(
        f"- {message}" for message in found.values())


def health_markdown(records: list[dict], samples: list[dict]) -> str:
    warnings = check_health(records, samples)
    return "\n".join(f"⚠ **Run health:** {w.message} (metric `{w.metric}`, step {w.step})" for w in warnings)


def with_notes(work: Callable[[Callable[[str], None]], Any]) -> Iterator[str]:
    """Run `work(log)` in a worker thread and yield each note it logs as it comes; the
    generator's return value is work's result (its exception is raised here)."""
    notes: queue.Queue[str] = queue.Queue()
    future = _model_work.submit(work, notes.put)
    while not (future.done() and notes.empty()):
        try:
            yield notes.get(timeout=0.2)
        except queue.Empty:
            continue
    return future.result()


# The Use tab's evaluation tables (also their headers before the first evaluation).
EVAL_COLUMNS = ["metric", "base model", "with the adapter", "change"]
EXAMPLE_COLUMNS = ["prompt", "answer", "base model", "with the adapter"]


class Handlers:
    def __init__(self, ctx: AppContext, jobs: JobManager, adapter_try_it: AdapterTryIt | None = None):
        from lowvram_grpo.app.try_rewards import BaseSampler

        self.ctx, self.jobs = ctx, jobs
        self.adapter_try_it = adapter_try_it or AdapterTryIt()
        # Try rewards' base model shares try-it's slot: one model in the process.
        self.sampler = BaseSampler(self.adapter_try_it.models)
        self._seq = itertools.count(1)
        self.live = dashboard.LiveRuns()  # the watched runs' files, read a few new lines per refresh

    def gpu_busy(self, what: str) -> str | None:
        """Why model work must wait: a training on the GPU needs all of its memory."""
        import torch

        if self.jobs.running() is not None and torch.cuda.is_available():
            return "⚠ " + GPU_BUSY.format(what=what)
        return None

    # --- runs ----------------------------------------------------------------------------------

    def runs(self) -> list[str]:
        return dashboard.list_runs(self.ctx.runs_dir)

    def run_dir(self, name: str | None) -> Path | None:
        """A run directory from a name the browser sent: only names of existing runs are accepted
        (a directory right under runs_dir holding a config.yaml, as dashboard.list_runs lists them;
        checked on that one path, not by listing every run on each 2-second refresh)."""
        if not name or Path(name).name != name or name == "..":  # one directory name, right under runs_dir
            return None
        candidate = self.ctx.runs_dir / name
        return candidate if candidate.is_dir() and RunDir(candidate).config_file.is_file() else None

    # --- set up --------------------------------------------------------------------------------

    def form_dict(self, values) -> dict[str, Any]:
        return dict(zip(FORM_KEYS, values))

    def load_preset(self, preset):
        """The preset's values into the form; the previous dataset's preview goes."""
        try:
            form = setup.preset_form_values(preset or None)
        except ConfigError as err:
            return [gr.skip()] * (len(FORM_KEYS) - 1) + [gr.update(value=f"⚠ {err}", visible=True)]
        return [form[k] for k in FORM_KEYS if k != "preset"] + [gr.update(value="", visible=False)]

    def auto_preview(self, source, prompt_column, answer_column):
        if setup.source_kind((source or "").strip()) == "hub":  # may mean a download: only on request
            return (pd.DataFrame(), gr.skip(), gr.skip(),
                    "Press Preview to load the first rows of the hub dataset.")
        return self.preview(source, prompt_column, answer_column)

    def preview(self, source, prompt_column, answer_column):
        source = (source or "").strip()
        if source and setup.source_kind(source) == "local" and not self.ctx.allow_local_paths and \
                not setup.inside(Path(source).expanduser(), self.ctx.work_dir / "uploads"):
            return pd.DataFrame(), gr.skip(), gr.skip(), "⚠ this app is shared: upload the dataset instead"
        try:
            columns, rows = setup.preview_rows(source)
        except DatasetError as err:
            return pd.DataFrame(), gr.skip(), gr.skip(), f"⚠ {err}"
        except Exception as err:  # e.g. a hub error: say so on the page
            return pd.DataFrame(), gr.skip(), gr.skip(), f"⚠ could not read {source}: {err}"
        note = f"Columns: {', '.join(f'`{c}`' for c in columns)}."
        if prompt_column not in columns:
            guess = next((c for c in LIKELY_PROMPT if c in columns), None)
            if guess:
                note += f" Prompt column set to `{guess}`."
                prompt_column = guess
            else:
                note += f" There is no `{prompt_column}` column: pick the prompt column."
        if answer_column and answer_column not in columns:
            answer_column = next((c for c in LIKELY_ANSWER if c in columns), "")
            note += f" Answer column set to `{answer_column or '(none)'}`."
        table = gr.update(value=pd.DataFrame(rows, columns=columns), datatype=setup.preview_datatypes(columns))
        return (table, gr.update(choices=columns, value=prompt_column),
                gr.update(choices=["", *columns], value=answer_column), note)

    def upload_dataset(self, file, prompt_column, answer_column):
        if not file:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
        try:
            saved = setup.save_upload(file, self.ctx.subdir("uploads"), setup.DATASET_SUFFIXES,
                                      Path(gradio.utils.get_upload_folder()))
        except ValueError as err:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠ {err}"
        table, prompt_update, answer_update, note = self.preview(str(saved), prompt_column, answer_column)
        return str(saved), table, prompt_update, answer_update, f"Saved as `{saved.name}`. {note}"

    def reward_choices(self, builtin: list) -> list:
        choices = list(builtin)
        for path in sorted(self.ctx.subdir("rewards").glob("*.py")):  # every file uploaded so far
            try:
                choices += [(f"{path.name}:{fn}", f"{path}:{fn}") for fn in setup.reward_functions_in_file(path)]
            except ValueError:
                continue
        return choices

    def upload_reward(self, file, builtin: list):
        if not file or not self.ctx.allow_custom_code:
            return [gr.skip()] * REWARD_SLOTS + ["⚠ custom reward code is off (--allow-custom-code)"]
        try:
            saved = setup.save_upload(file, self.ctx.subdir("rewards"), [".py"], Path(gradio.utils.get_upload_folder()))
            functions = setup.reward_functions_in_file(saved)
        except ValueError as err:
            return [gr.skip()] * REWARD_SLOTS + [f"⚠ {err}"]
        return [gr.update(choices=self.reward_choices(builtin))] * REWARD_SLOTS + [
            f"`{saved.name}` defines: {', '.join(functions) or 'no public functions'}; pick them as rewards below."]

    def check(self, *values):
        """Validate the form; show the memory plan for the settings the run will use, the CLI
        command and config.yaml."""
        config, found = setup.form_to_config(self.form_dict(values), self.ctx)
        if config is None:
            return [*error_updates(found), problems_markdown(found), "", gr.update(value="", visible=False),
                    gr.update(value="", visible=False)]
        headline, text = setup.memory_plan(config)
        what = f"$ {setup.cli_command(config)}\n\n# config.yaml\n{setup.config_yaml(config)}"
        return [*error_updates({}), "✓ Settings are valid.", headline, gr.update(value=text, visible=True),
                gr.update(value=what, visible=True)]

    def start(self, *values):
        running = self.jobs.running()
        if running is not None:
            return [*[gr.skip()] * len(ERROR_FIELDS), f"⚠ A training is already running (run "
                    f"'{Path(running.run_dir).name}'): stop it first.", gr.skip(), gr.skip()]
        config, found = setup.form_to_config(self.form_dict(values), self.ctx)
        if config is None:
            return [*error_updates(found), problems_markdown(found), gr.skip(), gr.skip()]
        try:
            job = self.jobs.start(config)
        except JobError as err:
            return [*error_updates({}), f"⚠ {err}", gr.skip(), gr.skip()]
        name = Path(job.run_dir).name
        return [*error_updates({}), f"Started run `{name}` (pid {job.pid}).",
                gr.update(choices=self.runs(), value=name), gr.Tabs(selected="watch")]

    # --- train and watch -----------------------------------------------------------------------

    def stop(self):
        try:
            return self.jobs.stop()
        except JobError as err:
            return f"⚠ {err}"

    def resume(self, name):
        run_dir = self.run_dir(name)
        if run_dir is None:
            return "⚠ choose a run to resume"
        try:
            job = self.jobs.resume(run_dir)
        except JobError as err:
            return f"⚠ {err}"
        return f"Resumed run `{name}` (pid {job.pid}) from {RunDir(run_dir).latest_checkpoint().name}."

    def more_steps(self, name, extra):
        run_dir = self.run_dir(name)
        if run_dir is None:
            return "⚠ choose a run"
        try:
            job = self.jobs.continue_run(run_dir, int(extra or 0))
        except (JobError, ConfigError) as err:
            return f"⚠ {err}"
        return f"Continuing run `{name}` (pid {job.pid}) for {int(extra)} more steps."

    def refresh(self, name, compare, sent):
        """The selected run's status, health, log and checkpoints, the buttons its state allows,
        and the curve rows the page does not have yet (for it and the runs compared with it)."""
        sent = dict(sent or {})
        run_dir = self.run_dir(name)
        if run_dir is None:
            delta, now = dashboard.curve_delta({}, sent, next(self._seq))
            disabled = gr.update(interactive=False)
            return ["No run selected: start one on the Set up tab.", "",
                    dashboard.delta_json(delta) if delta else gr.skip(), "", "", disabled, disabled, disabled, now]
        status = run_state(run_dir, self.jobs)
        run = RunDir(run_dir)
        selected = self.live.read(run_dir, samples=True)
        runs = {name: selected}
        for other in compare or []:
            other_dir = self.run_dir(other)
            if other_dir is not None and other != name:
                runs[other] = self.live.read(other_dir)
        delta, now = dashboard.curve_delta(runs, sent, next(self._seq))
        buttons = dashboard.buttons_for(status.get("state", "empty"), run.latest_checkpoint() is not None,
                                        self.jobs.running() is not None)
        log = tail(run_dir / LOG_NAME)
        return [dashboard.status_html(name, status, selected.metrics),
                health_markdown(selected.metrics, selected.samples),
                dashboard.delta_json(delta) if delta else gr.skip(), log_html(log),
                dashboard.checkpoints_markdown(run_dir), gr.update(interactive=buttons.stop),
                gr.update(interactive=buttons.resume), gr.update(interactive=buttons.more_steps), now]

    def on_load(self):
        """Reattach: show the running job if there is one (and its settings in the form, so a
        reload does not forget the upload and the rewards), else the newest run."""
        runs = self.runs()
        job = self.jobs.running()
        if job is not None and Path(job.run_dir).name in runs:
            name = Path(job.run_dir).name
            try:
                form = setup.clone_form_values(RunDir(job.run_dir).config_file)
                form_out = [form[k] for k in FORM_KEYS]
            except ConfigError:
                form_out = [gr.skip()] * len(FORM_KEYS)
            return [gr.update(choices=runs, value=name), f"Reattached to the running training `{name}`.", *form_out]
        return [gr.update(choices=runs, value=runs[0] if runs else None), "", *[gr.skip()] * len(FORM_KEYS)]

    # --- runs table ----------------------------------------------------------------------------

    def runs_table(self):
        choices = self.runs()
        rows = []
        for name in choices:
            run_dir = self.ctx.runs_dir / name
            rows.append(dashboard.run_row(run_dir, run_state(run_dir, self.jobs), RunDir(run_dir).metrics()))
        return (pd.DataFrame(rows, columns=dashboard.RUN_TABLE_COLUMNS), gr.update(choices=choices),
                gr.update(choices=choices))

    def clone(self, name):
        """A run's settings into the Set-up form (under a new, empty run name)."""
        run_dir = self.run_dir(name)
        if run_dir is None:
            return [gr.skip()] * len(FORM_KEYS) + ["⚠ choose a run to copy", gr.skip()]
        try:
            form = setup.clone_form_values(RunDir(run_dir).config_file)
        except ConfigError as err:
            return [gr.skip()] * len(FORM_KEYS) + [f"⚠ {err}", gr.skip()]
        return [form[k] for k in FORM_KEYS] + [f"Settings of `{name}` copied into Set up: give the new run a "
                                               "name and Start.", gr.Tabs(selected="setup")]

    def delete(self, name, confirmed):
        run_dir = self.run_dir(name)
        if run_dir is None:
            return "⚠ choose a run to delete"
        if not confirmed:
            return f"Tick \"yes, delete it\" to delete run `{name}` and all its files."
        job = self.jobs.running()
        if job is not None and Path(job.run_dir) == run_dir.resolve():
            return f"⚠ run `{name}` is training: stop it first"
        shutil.rmtree(run_dir)
        return f"Deleted run `{name}`."

    # --- completions ---------------------------------------------------------------------------

    def completions(self, name, step_from, step_to, min_reward, function, text):
        run_dir = self.run_dir(name)
        if run_dir is None:
            return pd.DataFrame(columns=dashboard.COMPLETION_COLUMNS), gr.update(choices=[""]), "⚠ choose a run", ""
        try:
            bounds = [_optional_number(v) for v in (step_from, step_to, min_reward)]
        except ValueError as err:
            return gr.skip(), gr.skip(), f"⚠ {err}", gr.skip()
        samples = RunDir(run_dir).completions()
        rows = dashboard.filter_completions(samples, *bounds, function or "", text or "")
        shown = dashboard.trajectories_html(dashboard.matching_completions(samples, *bounds, function or "", text or ""))
        functions = dashboard.completion_functions(samples)
        message = f"{len(rows)} of {len(samples)} logged completions"
        message += " (the newest 200)" if len(rows) == 200 else ""
        return (pd.DataFrame(rows, columns=dashboard.COMPLETION_COLUMNS),
                gr.update(choices=["", *functions], value=function if function in functions else ""), message, shown)

    # --- try rewards ---------------------------------------------------------------------------

    def score_rewards(self, *values):
        """Score pasted completions with the form's reward functions, as one group."""
        *reward_values, prompt, answer, pasted, scale, image = values
        from lowvram_grpo.app import try_rewards
        from lowvram_grpo.rewards.base import RewardFunctionError

        specs = []
        for i in range(REWARD_SLOTS):
            name, weight = (reward_values[2 * i] or "").strip(), reward_values[2 * i + 1]
            if name:
                problem = setup.reward_problem(name, self.ctx)
                if problem:
                    return pd.DataFrame(), f"⚠ {problem}"
                specs.append(RewardSpec(name, float(weight if weight is not None else 1.0)))
        if not specs:
            return pd.DataFrame(), "⚠ pick at least one reward function on the Set up tab"
        row = {"prompt": prompt or "", "answer": answer or ""}
        if image is not None:  # reward functions get it as TRL passes an image column: `images`
            row["images"] = [image]
        try:
            columns, table = try_rewards.score_group(specs, row, try_rewards.split_completions(pasted),
                                                     scale or "group")
        except (ValueError, RewardFunctionError) as err:
            return pd.DataFrame(), f"⚠ {err}"
        return pd.DataFrame(table, columns=columns), (
            f"{len(table)} completions scored as one group with {', '.join(s.name for s in specs)}; advantages "
            f"with scale_rewards={scale or 'group'}.")

    def score_base_model(self, *values):
        """Sample G completions of the form's model (no adapter) for each of the dataset's first
        `num_rows` rows and score them with the form's rewards, one group per row. A generator:
        the page shows a note while the model loads and generates."""
        *form_values, num_rows = values
        from lowvram_grpo.app.try_rewards import check_num_rows
        from lowvram_grpo.rewards.base import RewardFunctionError

        rows = int(num_rows or 0)
        try:
            check_num_rows(rows)
        except ValueError as err:
            yield gr.skip(), f"⚠ {err}"
            return
        busy = self.gpu_busy("sample the base model")
        if busy:
            yield gr.skip(), busy
            return
        form = self.form_dict(form_values)
        # The run name is not used here, and the form often still holds the name of a run just
        # started, which the check would refuse as taken.
        config, found = setup.form_to_config({**form, "run_name": ""}, self.ctx)
        if config is None:
            yield gr.skip(), problems_markdown(found, " on Set up")
            return
        yield gr.skip(), (f"⏳ Sampling {config.num_generations} completions for each of the first {rows} rows "
                          f"with `{config.model_name_or_path}` (the model loads on the first click)…")
        try:
            groups = self.sampler.sample(config, rows)
        except (ValueError, ConfigError, DatasetError, RewardFunctionError) as err:
            yield gr.skip(), f"⚠ {err}"
            return
        except Exception as err:  # a load or generation failure shows on the page, never crashes it
            yield gr.skip(), f"⚠ {type(err).__name__}: {err}"
            return
        zero = groups.zero_std_groups
        signal = (f" {zero} of {groups.num_rows} groups got the same reward for every completion: no learning "
                  "signal there." if zero else " Every group's rewards differ: each gives a learning signal.")
        yield pd.DataFrame(groups.table, columns=groups.columns), (
            f"The base model `{config.model_name_or_path}` (no adapter), {groups.num_generations} completions for each "
            f"of the first {groups.num_rows} rows (temperature {config.temperature:g}, up to "
            f"{config.max_completion_length} tokens), scored as the first training step would: mean reward "
            f"{groups.mean_reward:.3f}.{signal}")

    # --- use the adapter -----------------------------------------------------------------------

    def adapters(self, name, current=None):
        """The run's adapters, newest first; the one picked stays picked while it exists."""
        run_dir = self.run_dir(name)
        choices = dashboard.adapter_choices(run_dir) if run_dir else []
        return gr.update(choices=choices, value=current if current in choices else choices[0] if choices else None)

    def zip(self, name, adapter):
        run_dir = self.run_dir(name)
        if run_dir is None:
            return None, "⚠ choose a run first"
        source = dashboard.pick_adapter(run_dir, adapter)
        try:
            out = dashboard.zip_adapter(run_dir, self.ctx.subdir("exports"), source)
        except ValueError as err:
            return None, f"⚠ {err}"
        return str(out), f"Adapter from `{source.name}` zipped."

    def try_it(self, name, adapter, prompt, max_new_tokens, image=None):
        run_dir = self.run_dir(name)
        if run_dir is None:
            return "", "", "⚠ choose a run first"
        if not prompt:
            return "", "", "⚠ type a prompt"
        busy = self.gpu_busy("try the adapter")
        if busy:
            return "", "", busy
        source = dashboard.pick_adapter(run_dir, adapter)
        if source is None:
            return "", "", "⚠ this run has no adapter yet: wait for the first checkpoint"
        try:
            base, tuned = self.adapter_try_it.generate(run_dir, source, prompt, int(max_new_tokens or 32), image)
        except Exception as err:  # show any load/generation failure on the page, never crash it
            return "", "", f"⚠ {type(err).__name__}: {err}"
        return base, tuned, f"Adapter: `{source.name}`, greedy decoding."

    def evaluate(self, name, adapter, max_prompts):
        """Base model vs base + adapter on the run's held-out prompts (evaluate.compare): the
        metrics side by side and a few prompts with both answers. A generator: progress notes
        show while it runs."""
        from lowvram_grpo.evaluate import compare, comparison_rows
        from lowvram_grpo.rewards.base import completion_text

        empty = pd.DataFrame()
        run_dir = self.run_dir(name)
        source = dashboard.pick_adapter(run_dir, adapter) if run_dir else None
        problem = ("⚠ choose a run first" if run_dir is None else
                   "⚠ this run has no adapter yet: wait for the first checkpoint" if source is None else
                   self.gpu_busy("evaluate"))
        if problem:
            yield problem, empty, empty
            return
        try:
            config = RunDir(run_dir).read_config({"gradient_checkpointing": False}, key="run")
        except ConfigError as err:
            yield f"⚠ {err}", empty, empty
            return
        limit = int(max_prompts) if max_prompts else None
        notes, examples = [], []
        yield f"⏳ Loading `{config.model_name_or_path}` with `{source.name}`…", empty, empty

        def work(log):
            with self.adapter_try_it.models.lock:  # the cached model goes first: this loads its own
                self.adapter_try_it.models.clear()
                return compare(config, source, limit, log=log, examples=examples)

        try:
            progress = with_notes(work)
            while True:
                notes.append(next(progress))
                yield f"⏳ {notes[-1]}…", empty, empty
        except StopIteration as done:
            before, after = done.value
        except Exception as err:  # a load or generation failure shows on the page, never crashes it
            yield f"⚠ {type(err).__name__}: {err}", empty, empty
            return
        table = pd.DataFrame([[metric, round(b, 4), round(a, 4), round(d, 4)]
                              for metric, b, a, d in comparison_rows(before, after)],
                             columns=EVAL_COLUMNS)
        shown = pd.DataFrame([[completion_text(e["prompt"]), "" if e["answer"] is None else str(e["answer"]),
                               e["base"], e["adapter"]] for e in examples[:EXAMPLES_SHOWN]],
                             columns=EXAMPLE_COLUMNS)
        change = after["eval/reward"] - before["eval/reward"]
        yield (f"`{source.name}` on {int(after['eval/num_prompts'])} prompts, greedy: mean reward "
               f"{before['eval/reward']:.3f} (base) → {after['eval/reward']:.3f} (adapter), {change:+.3f}. "
               + " ".join(f"_{n}_" for n in notes)), table, shown

    def merge(self, name, adapter, directory, dtype):
        """Merge the adapter into its base model (16-bit, on the CPU) and save it to the
        directory the user names (export.merge_adapter). A generator: a note shows meanwhile."""
        from lowvram_grpo.export import GGUF_HINT, merge_adapter

        run_dir = self.run_dir(name)
        source = dashboard.pick_adapter(run_dir, adapter) if run_dir else None
        if run_dir is None or source is None:
            yield "⚠ choose a run first" if run_dir is None else "⚠ this run has no adapter yet"
            return
        try:
            dest = setup.merge_destination(directory, self.ctx)
            config = RunDir(run_dir).read_config(key="run")
        except (ValueError, ConfigError) as err:
            yield f"⚠ {err}"
            return
        yield f"⏳ Merging `{source.name}` into `{config.model_name_or_path}` ({dtype or 'float16'}, on the CPU)…"
        try:
            # The run's own model name: an adapter records its base as a local path, which for
            # builtin:tiny is a cache directory that may have moved.
            out = merge_adapter(source, dest, base_model=config.model_name_or_path, dtype=dtype or "float16",
                                trust_remote_code=config.trust_remote_code)
        except ConfigError as err:  # ExportError: e.g. the directory filled up meanwhile
            yield f"⚠ {err}"
            return
        except Exception as err:  # a load failure shows on the page, never crashes it
            yield f"⚠ {type(err).__name__}: {err}"
            return
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**20
        yield (f"Saved the merged model to `{out}` ({size:,.1f} MB): load it with "
               f"`AutoModelForCausalLM.from_pretrained(\"{out}\")`.\n\n```\n{GGUF_HINT.format(out=out)}\n```")


def _optional_number(value) -> float | None:
    """A filter field's number; empty means no filter."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return float(text) if text else None
    except ValueError:
        raise ValueError(f"'{text}' is not a number: give a number, or leave the field empty") from None


def log_html(text: str) -> str:
    """The log's tail in a <pre> that the page keeps scrolled to its end (see ui.LOG_JS)."""
    return f"<pre class='log'>{dashboard.escape(text) or '(no log yet)'}</pre>"
