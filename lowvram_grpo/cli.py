"""`lowvram-grpo`: the command line front end.

    lowvram-grpo train --preset tiny-cpu
    lowvram-grpo train --config my.yaml --output-dir runs/x lr=2e-5 num_generations=8
    lowvram-grpo train --resume runs/x
    lowvram-grpo train --preset X --dry-run
    lowvram-grpo train --preset X --num-processes 2        (data-parallel, one process per GPU)
    lowvram-grpo presets
    lowvram-grpo rewards
    lowvram-grpo keys
    lowvram-grpo plan --preset X --vram-gb 16 [key=value ...]
    lowvram-grpo eval --preset X --adapter runs/x/final [--max-prompts N]
    lowvram-grpo export --adapter runs/x/final --merge out/model [--dtype float16]
    lowvram-grpo ui [--host H] [--port P] [--share] [--auth user:pass | --auth-file F] [--allow-custom-code]
                    [--allow-code-execution] [--work-dir DIR]

Bad input (an unknown key, a missing file, a broken reward function) ends with one line that
names the problem and the fix, and exit status 2; a traceback means a bug in lowvram-grpo.
The package's warnings (each module's `logging.getLogger(__name__)`) are `warning: ...` lines
on stderr, from the main process only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from lowvram_grpo.config import ConfigError, list_presets, load_config, parse_overrides, preset_path, read_yaml
from lowvram_grpo.errors import UserError
from lowvram_grpo.rundir import RunDir

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowvram-grpo", description="GRPO fine-tuning on one consumer GPU.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a LoRA adapter with GRPO")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a named preset (see `lowvram-grpo presets`)")
    source.add_argument("--config", help="a YAML config file")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--output-dir", help="run directory (same as output_dir=...)")
    train.add_argument("--dataset", help="dataset file, folder or hub id (same as dataset=...)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--num-processes", type=int, default=1, metavar="N",
                       help="train data-parallel on N processes, one per GPU (runs itself under "
                            "`accelerate launch --num_processes N`)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=2e-5")

    commands.add_parser("presets", help="list the presets")
    commands.add_parser("rewards", help="list the kinds of reward: built-ins, reward models, judges, your own")
    commands.add_parser("keys", help="list every config key with its type, default, group and help")

    plan = commands.add_parser(
        "plan", help="estimate GPU memory from the model's config and choose chunk sizes that fit")
    plan_source = plan.add_mutually_exclusive_group()
    plan_source.add_argument("--preset", help="a named preset (see `lowvram-grpo presets`)")
    plan_source.add_argument("--config", help="a YAML config file")
    plan.add_argument("--vram-gb", type=float, required=True, metavar="GB",
                      help="GPU memory to plan for, e.g. 8, 12, 16 or 24")
    plan.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. model=Qwen/Qwen2.5-7B-Instruct max_completion_length=1024")

    evaluate = commands.add_parser(
        "eval", help="compare the base model and an adapter on held-out prompts (greedy decoding)")
    eval_source = evaluate.add_mutually_exclusive_group()
    eval_source.add_argument("--preset", help="the preset the adapter was trained with")
    eval_source.add_argument("--config", help="the config file the adapter was trained with")
    evaluate.add_argument("--adapter", required=True, metavar="DIR",
                          help="adapter directory, e.g. runs/x/final (without --preset/--config, "
                               "the run's config.yaml next to it is used)")
    evaluate.add_argument("--max-prompts", type=int, metavar="N", help="evaluate at most N prompts")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="config overrides, e.g. max_completion_length=512")

    export = commands.add_parser("export", help="merge an adapter into its base model (16-bit) and save it")
    export.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory, e.g. runs/x/final")
    export.add_argument("--merge", required=True, metavar="OUT", help="directory for the merged model")
    export.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="weights dtype of the merged model (default: float16)")
    export.add_argument("--base", metavar="MODEL",
                        help="base model hub id or directory (default: the one recorded in the adapter)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the base model's custom code")

    add_ui_parser(commands)
    return parser


def resolve_train_config(args: argparse.Namespace):
    overrides = parse_overrides(args.overrides)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.resume:
        return RunDir(args.resume).read_config({**overrides, "output_dir": str(args.resume)})
    if not args.preset and not args.config:
        raise ConfigError("train: give --preset NAME (try tiny-cpu), --config FILE or --resume RUN_DIR")
    return load_config(preset=args.preset, config_path=args.config, overrides=overrides)


def cmd_train(args: argparse.Namespace) -> int:
    config = resolve_train_config(args)
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        dry_run_checks(config)
        return 0
    from lowvram_grpo import distributed

    if args.num_processes != 1:
        distributed.check_world_size(config, args.num_processes)  # before starting N processes
        return distributed.launch(args.num_processes, _train_argv(args))
    from lowvram_grpo.trainer import train

    if args.no_progress:  # also the libraries' bars (loading weights), which fill a log file with \r lines
        import transformers

        transformers.utils.logging.disable_progress_bar()
    result = train(config, resume=bool(args.resume), progress=not args.no_progress)
    if distributed.is_main_process():
        if result.finished:
            print(f"adapter saved to {result.adapter}")
        elif result.adapter is None:
            print("stopped before the first step finished; there is nothing to resume")
        else:
            print(f"stopped; checkpoint saved in {result.adapter} "
                  f"(continue with: lowvram-grpo train --resume {result.run_dir.path})")
    return 0


def dry_run_checks(config) -> None:
    """What --dry-run checks beyond the config, without downloading anything: every reward
    function loads, a local dataset reads and validates, a model directory exists. Hub datasets
    and models not in the local cache are noted; training checks them before the model loads."""
    from lowvram_grpo.data import read_prompt_rows
    from lowvram_grpo.model import ModelNotDownloaded, check_model_available
    from lowvram_grpo.rewards.loading import load_reward_functions
    from lowvram_grpo.tables import is_hub_id

    load_reward_functions(config.rewards)
    hub_data = [source for source in (config.dataset, config.eval_dataset) if source and is_hub_id(source)]
    if hub_data:
        print(f"note: {', '.join(hub_data)} is a hub dataset: not read by --dry-run, but checked when training "
              "starts, before the model loads", file=sys.stderr)
    else:
        read_prompt_rows(config)
    try:
        check_model_available(config.model_name_or_path)
    except ModelNotDownloaded as err:
        print(f"note: {err}", file=sys.stderr)


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The `train` arguments again, without --num-processes: what each launched process runs."""
    argv = ["train"]
    for flag, value in (("--preset", args.preset), ("--config", args.config), ("--resume", args.resume),
                        ("--output-dir", args.output_dir), ("--dataset", args.dataset)):
        if value:
            argv += [flag, value]
    if args.no_progress:
        argv.append("--no-progress")
    return argv + list(args.overrides)


def cmd_presets(_: argparse.Namespace) -> int:
    rows = []
    for name in list_presets():
        values = read_yaml(preset_path(name))
        rows.append((name, str(values.get("model_name_or_path", "builtin:tiny")),
                     str(values.get("dataset", "builtin:arith")), _target_memory(name)))
    widths = [max(len(r[i]) for r in rows + [("preset", "model", "dataset", "target")]) for i in range(4)]
    for row in [("preset", "model", "dataset", "target")] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _target_memory(name: str) -> str:
    """The `# target: ...` line of a preset's header comment."""
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if line.lower().startswith("# target:"):
            return line.split(":", 1)[1].strip()
    return "-"


def cmd_rewards(_: argparse.Namespace) -> int:
    """Every kind of reward, one line each: the built-ins, then the other kinds."""
    from lowvram_grpo.rewards.builtins import BUILTIN_REWARDS
    from lowvram_grpo.rewards.loading import REWARD_KINDS

    lines = [(name, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
             for name, fn in sorted(BUILTIN_REWARDS.items())]
    lines += list(REWARD_KINDS.items())
    width = max(len(name) for name, _ in lines)
    for name, summary in lines:
        print(f"{name.ljust(width)}  {summary}")
    return 0


def cmd_keys(_: argparse.Namespace) -> int:
    from lowvram_grpo.config_docs import keys_text

    print(keys_text(), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowvram_grpo.evaluate import compare, format_comparison
    from lowvram_grpo.export import read_adapter_config

    read_adapter_config(args.adapter)  # a missing adapter is the first thing to report
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ConfigError(f"--max-prompts: must be at least 1, got {args.max_prompts}")
    overrides = parse_overrides(args.overrides)
    if args.preset or args.config:
        config = load_config(preset=args.preset, config_path=args.config, overrides=overrides)
    else:
        # An adapter inside a run directory (final/, checkpoint-N/) has the run's config next to it.
        run = RunDir(Path(args.adapter).resolve().parent)
        if not run.config_file.is_file():
            raise ConfigError("eval: give --preset NAME or --config FILE (the one the adapter was "
                              f"trained with); {run.config_file} does not exist")
        config = run.read_config(overrides)
    before, after = compare(config, args.adapter, max_prompts=args.max_prompts)
    print(format_comparison(before, after))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lowvram_grpo.export import GGUF_HINT, merge_adapter

    out = merge_adapter(args.adapter, args.merge, base_model=args.base, dtype=args.dtype,
                        overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"merged model saved to {out}")
    print(GGUF_HINT.format(out=out))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory breakdown; exit 0 if the run fits in --vram-gb, 1 (saying what to
    reduce) if even one sequence at a time does not."""
    from lowvram_grpo.planning.model_shape import PlannerError
    from lowvram_grpo.planning.planner import format_plan, plan

    if args.vram_gb <= 0:
        raise ConfigError(f"--vram-gb: must be more than 0, got {args.vram_gb:g}")
    config = load_config(preset=args.preset, config_path=args.config, overrides=args.overrides)
    try:
        result = plan(config, args.vram_gb)
    except PlannerError as err:  # e.g. a model name the planner cannot find a config for
        raise ConfigError(str(err)) from None
    print(format_plan(result))
    if not result.fits:
        print(f"error: this run does not fit in {args.vram_gb:g} GB (and {result.ram_gb:.0f} GB of CPU memory) even "
              "one sequence at a time; " + "; ".join(result.advice), file=sys.stderr)
        return 1
    source = f"--preset {args.preset} " if args.preset else f"--config {args.config} " if args.config else ""
    # The user's other overrides, then the chosen chunk sizes (replacing any given, "auto" too).
    kept = [o for o in args.overrides if o.partition("=")[0] not in result.overrides]
    words = ["lowvram-grpo", "train", *source.split(), *kept,
             *(f"{key}={_yaml_word(value)}" for key, value in result.overrides.items())]
    print("\nto train with these: " + " ".join(words))
    return 0


def _yaml_word(value) -> str:
    """A value as `key=value` on the command line reads back (overrides are parsed as YAML)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def add_ui_parser(commands) -> argparse.ArgumentParser:
    """`lowvram-grpo ui` (and `python app.py`, which parses the same flags)."""
    ui = commands.add_parser("ui", help="the web app: set up, start, watch and use runs in a browser")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    ui.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    ui.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    ui.add_argument("--auth", metavar="USER:PASS",
                    help="require this login (recommended with --host or --share); other users of this machine "
                         "can read command lines, so on a shared machine prefer --auth-file or $LOWVRAM_GRPO_AUTH")
    ui.add_argument("--auth-file", metavar="FILE", help="require a login from FILE: one USER:PASS per line")
    ui.add_argument("--allow-custom-code", action="store_true",
                    help="allow uploading Python reward files (they run with your permissions)")
    ui.add_argument("--allow-code-execution", action="store_true",
                    help="offer the code_tests reward, which runs the model's code (sandboxed) on this machine")
    ui.add_argument("--work-dir", default="runs/app", metavar="DIR",
                    help="where the app keeps runs, uploads and exports (default: runs/app)")
    return ui


def ui_logins(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The logins the app requires: --auth, the lines of --auth-file, or $LOWVRAM_GRPO_AUTH
    (the first that is given); None = no login."""
    if args.auth is not None and args.auth_file:
        raise ConfigError("--auth and --auth-file are both given; use one")
    if args.auth_file:
        try:
            text = Path(args.auth_file).expanduser().read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"--auth-file: cannot read {args.auth_file} ({err.strerror})") from None
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
        entries = [(f"--auth-file {args.auth_file} line {n}", line) for n, line in lines
                   if line and not line.startswith("#")]
        if not entries:
            raise ConfigError(f"--auth-file: {args.auth_file} holds no USER:PASS line")
    elif args.auth is not None:
        entries = [("--auth", args.auth)]
    elif os.environ.get("LOWVRAM_GRPO_AUTH"):
        entries = [("LOWVRAM_GRPO_AUTH", os.environ["LOWVRAM_GRPO_AUTH"])]
    else:
        return None
    logins = []
    for where, entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"{where}: expected USER:PASS, for example alice:s3cret")
        logins.append((user, password))
    return logins


def cmd_ui(args: argparse.Namespace) -> int:
    auth = ui_logins(args)
    try:
        from lowvram_grpo.app.ui import launch
    except ImportError as err:
        raise ConfigError(f"the web app needs gradio ({err}); "
                          "install it with: pip install 'lowvram-grpo[ui]'") from None
    launch(host=args.host, port=args.port, share=args.share, auth=auth, allow_custom_code=args.allow_custom_code,
           allow_code_execution=args.allow_code_execution, work_dir=args.work_dir)
    return 0


COMMANDS = {"train": cmd_train, "presets": cmd_presets, "rewards": cmd_rewards, "keys": cmd_keys, "eval": cmd_eval,
            "export": cmd_export, "plan": cmd_plan, "ui": cmd_ui}


class WarningLines(logging.StreamHandler):
    """The package's warnings as `warning: ...` lines on stderr (the app and the tests read them
    in train.log), shown by the main process only: with several processes (distributed.py) each
    would print the same warning. Writes to whatever sys.stderr is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)
        self.addFilter(lambda record: _on_main_process())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _on_main_process() -> bool:
    from lowvram_grpo import distributed  # torch: loaded only once there is something to show

    return distributed.is_main_process()


def show_warnings() -> None:
    """Install WarningLines on the package's logger, once per process."""
    logger = logging.getLogger("lowvram_grpo")
    if not any(isinstance(handler, WarningLines) for handler in logger.handlers):
        logger.addHandler(WarningLines())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, with `key=value` overrides accepted anywhere on the line: argparse alone takes
    them only in one run, so `train --preset X lr=1e-3 --dry-run max_steps=2` would fail."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    show_warnings()
    try:
        return COMMANDS[args.command](args)
    except (UserError, FileNotFoundError) as err:  # bad input, not a bug: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a second Ctrl-C during training: quit without a traceback
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
