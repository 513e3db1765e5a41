"""`lowvram-grpo`: the command line front end.

    lowvram-grpo train --preset tiny-cpu
    lowvram-grpo train --config my.yaml --output-dir runs/x lr=2e-5 num_generations=8
    lowvram-grpo train --resume runs/x
    lowvram-grpo train --preset X --dry-run
    lowvram-grpo presets
    lowvram-grpo rewards

Bad input (an unknown key, a missing file, a broken reward function) ends with one line that
names the problem and the fix, and exit status 2; a traceback means a bug in lowvram-grpo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from lowvram_grpo.config import ConfigError, build_config, list_presets, load_config, parse_overrides, preset_path, read_yaml

EXIT_USAGE = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input rather than a bug (imported lazily: torch is slow)."""
    from lowvram_grpo.data import DatasetError
    from lowvram_grpo.model import ModelLoadError
    from lowvram_grpo.rewards import RewardFunctionError

    return (ConfigError, DatasetError, ModelLoadError, RewardFunctionError, FileNotFoundError)


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
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=2e-5")

    commands.add_parser("presets", help="list the presets")
    commands.add_parser("rewards", help="list the built-in reward functions")
    return parser


def resolve_train_config(args: argparse.Namespace):
    overrides = parse_overrides(args.overrides)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {args.resume} has no config.yaml; is it a lowvram-grpo run directory?")
        values = read_yaml(saved)
        values.update(overrides)
        values["output_dir"] = str(args.resume)
        return build_config(values)
    if not args.preset and not args.config:
        raise ConfigError("train: give --preset NAME (try tiny-cpu), --config FILE or --resume RUN_DIR")
    return load_config(preset=args.preset, config_path=args.config, overrides=overrides)


def cmd_train(args: argparse.Namespace) -> int:
    config = resolve_train_config(args)
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from lowvram_grpo.trainer import train

    result = train(config, resume=bool(args.resume), progress=not args.no_progress)
    print(f"adapter saved to {result}" if result.name == "final" else
          f"stopped; checkpoint saved in {result} (continue with: lowvram-grpo train --resume {result})")
    return 0


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
    from lowvram_grpo.rewards import BUILTIN_REWARDS

    width = max(map(len, BUILTIN_REWARDS))
    for name, fn in sorted(BUILTIN_REWARDS.items()):
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        print(f"{name.ljust(width)}  {summary}")
    return 0


COMMANDS = {"train": cmd_train, "presets": cmd_presets, "rewards": cmd_rewards}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
