"""Prompt data: load a table, map its columns, validate it, split off an eval set.

(How a prompt becomes text and tokens, chat template included, is prompts.py.)

A dataset is a local file (JSONL, JSON, CSV/TSV, Parquet; text formats may be `.gz`), a folder
of such files, a Hugging Face Hub id, or `builtin:arith` (the offline toy task). Every row
becomes `{"prompt": ..., "answer": ..., <other columns>}`: the prompt is a string or a
conversation (`[{"role": ..., "content": ...}]`, TRL's conversational format) and the other
columns are passed to reward functions by name, as TRL does.

Users hit data problems before anything else, so every problem becomes one `DatasetError`
whose single-paragraph message names the file, the line or row, and the fix. Local text files
are parsed with plain Python (json, csv) rather than `datasets` precisely so that those
messages can point at a line number. The user's files are only ever read.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram_grpo import vision
from lowvram_grpo.builtin import arith, calculator, code_tasks, guess_number, squares
from lowvram_grpo.config import TrainConfig
from lowvram_grpo.errors import DatasetError, clip, names, one_line, type_name
from lowvram_grpo.prompts import fill_template, with_system_prompt

# Extensions read from local files. Text formats may also be gzip-compressed (`.jsonl.gz`).
TEXT_FORMATS = (".jsonl", ".json", ".csv", ".tsv")
SUPPORTED = TEXT_FORMATS + (".parquet",)
SUPPORTED_HINT = ".jsonl, .json, .csv, .tsv, .parquet, or a gzipped text format such as .jsonl.gz"

BUILTINS: dict[str, Callable[[], list[dict]]] = {
    "builtin:arith": lambda: arith.arith_rows(1000, seed=0),
    "builtin:code": lambda: code_tasks.code_rows(),  # Python tasks with tests, for code_tests
    "builtin:sums": lambda: calculator.sums_rows(1000, seed=0),  # two-digit sums, for the calculator tool demo
    "builtin:guess-number": lambda: guess_number.guess_number_rows(1000, seed=0),  # for the GuessNumber environment
    # Count the squares in a picture (the vision demo), and its control with blank pictures.
    "builtin:squares": lambda: squares.squares_rows(),
    "builtin:squares-blank": lambda: squares.squares_rows(blank=True),
}

# Built-in tasks that come with a held-out split of their own, as a hub dataset has its "test":
# evaluation uses it when neither eval_fraction nor eval_dataset is set, so a run on the demo task
# has held-out prompts, while a user's own dataset is never evaluated on the built-in task.
# builtin:arith has only 100 distinct sums, so its test sums also occur among the training rows.
BUILTIN_TEST_SPLITS: dict[str, Callable[[], list[dict]]] = {
    "builtin:arith": lambda: arith.arith_rows(100, seed=1),
    # (seed 1 made the tiny vision model's warm-up pictures)
    "builtin:squares": lambda: squares.squares_rows(100, seed=2),
    "builtin:squares-blank": lambda: squares.squares_rows(100, seed=2, blank=True),
}

# Roles a conversation may use; anything else is almost always a typo ("bot", "human").
KNOWN_ROLES = ("system", "user", "assistant", "tool")

# Extensions that mark a string as a file path even when no such file exists (hub ids may
# contain dots, so only extensions that a dataset id would never end with count).
_FILE_LIKE = SUPPORTED + (".gz", ".txt", ".xlsx", ".xls", ".zip", ".arrow", ".yaml", ".yml")

# Column names that usually hold the prompt, to suggest `prompt_column=...`.
_LIKELY_PROMPT_COLUMNS = ("question", "problem", "instruction", "input", "query", "text",
                          "messages", "conversations", "prompt")
_LIKELY_ANSWER_COLUMNS = ("answer", "solution", "output", "target", "label", "completion",
                          "response", "final_answer", "ground_truth")


@dataclass
class PromptData:
    """Prompts ready for the trainer: mapped, validated and (with a tokenizer) length-filtered."""

    train: list[dict]
    eval: list[dict]
    source: str
    num_dropped_too_long: int = 0
    columns: list[str] = field(default_factory=list)


# --- public API ------------------------------------------------------------------------------


def load_prompt_data(config: TrainConfig, tokenizer=None) -> PromptData:
    """Load `config.dataset` (and the eval set) as validated prompt rows.

    With a tokenizer, prompts longer than `config.max_prompt_length` tokens (as the model sees
    them, chat template included) are dropped and counted; without one (the UI preview) the
    length check is skipped.
    """
    return finish_prompt_data(read_prompt_rows(config), config, tokenizer)


@dataclass
class PromptRows:
    """Validated prompt rows before tokenisation: what can be checked before the model loads."""

    train: list[dict]
    eval: list[dict]
    source: str


def read_prompt_rows(config: TrainConfig) -> PromptRows:
    """Read and validate `config.dataset` (and the eval set); no tokenizer needed, so a bad
    dataset is reported before minutes of model loading."""
    if config.eval_fraction > 0 and config.eval_dataset:
        raise DatasetError(
            f"eval_fraction={config.eval_fraction} and eval_dataset={config.eval_dataset} are "
            "both set; use one: eval_fraction holds out part of `dataset`, eval_dataset loads "
            "separate prompts (set the other to 0 / null).")
    table = _read(config.dataset, config.dataset_config, config.dataset_split)
    train = _prepare(table, config, "dataset")
    source = table.summary()

    eval_rows: list[dict] = []
    if config.eval_dataset:
        same_dataset = config.eval_dataset == config.dataset
        if same_dataset and (_is_local(config.dataset) or config.eval_split == config.dataset_split):
            raise DatasetError(
                f"eval_dataset is the same as dataset ({config.dataset}), so the eval prompts "
                "would be training prompts; use eval_fraction to hold some out, a separate "
                "file, or (for a hub dataset) another split with eval_split=<name>.")
        try:
            eval_table = _read(config.eval_dataset, config.dataset_config if same_dataset else None,
                               config.eval_split, split_key="eval_split")
            eval_rows = _prepare(eval_table, config, "eval_dataset")
        except DatasetError as err:  # say which key's data is wrong: both use one mapping
            raise DatasetError(
                f"eval_dataset: {str(err).rstrip('.')}. (eval_dataset is read with the same "
                "prompt_column, answer_column and prompt_template as dataset, so its columns "
                "must match.)") from None
        source += f"; eval: {eval_table.summary()}"
    elif config.eval_fraction == 0 and config.dataset in BUILTIN_TEST_SPLITS:
        test_split = _Table(BUILTIN_TEST_SPLITS[config.dataset](), config.dataset, detail="its test split")
        eval_rows = _prepare(test_split, config, "dataset")
        source += f"; eval: {test_split.summary()}"
    return PromptRows(train=train, eval=eval_rows, source=source)


def finish_prompt_data(rows: PromptRows, config: TrainConfig, tokenizer=None) -> PromptData:
    """Drop prompts too long for `max_prompt_length` (with a tokenizer) and hold out
    `eval_fraction` of the rest (see load_prompt_data)."""
    train, eval_rows, source = rows.train, rows.eval, rows.source
    dropped = 0
    if tokenizer is not None:
        train, dropped = _filter_by_length(train, tokenizer, config.max_prompt_length, "dataset")
        if eval_rows:
            eval_rows, eval_dropped = _filter_by_length(
                eval_rows, tokenizer, config.max_prompt_length, "eval_dataset")
            dropped += eval_dropped

    if config.eval_fraction > 0:
        train, eval_rows = split_eval(train, config.eval_fraction, config.seed)
        source += f"; eval: {len(eval_rows):,} rows held out (eval_fraction={config.eval_fraction})"

    return PromptData(train=train, eval=eval_rows, source=source, num_dropped_too_long=dropped,
                      columns=[c for c in _columns(train) if c != "prompt"])


def read_table(source: str, config_name: str | None = None, split: str = "train") -> list[dict]:
    """The raw rows of a local file or folder, a hub dataset, or a `builtin:` task."""
    return _read(source, config_name, split).rows


def preview(source: str, n: int = 5, config_name: str | None = None,
            split: str = "train") -> tuple[list[str], list[dict]]:
    """Column names and the first `n` raw rows, for the UI's dataset preview."""
    rows = read_table(source, config_name, split)
    return _columns(rows), rows[:n]


def format_prompt(row: dict, config: TrainConfig) -> str | list[dict]:
    """The prompt for one raw row: `prompt_template` or `prompt_column`, plus `system_prompt`
    (see with_system_prompt)."""
    if config.prompt_template is not None:
        prompt: Any = fill_template(config.prompt_template, row)
    elif config.prompt_column in row:
        prompt = row[config.prompt_column]
    else:
        raise DatasetError(_missing_column_message(
            "prompt", config.prompt_column, list(row), _LIKELY_PROMPT_COLUMNS), key="prompt_column")
    return with_system_prompt(prompt, config.system_prompt)


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random `fraction` of `rows` held out for eval; both keep the original order."""
    num_eval = round(len(rows) * fraction)
    if num_eval == 0:
        need = 1 / max(len(rows), 1)
        raise DatasetError(
            f"eval_fraction={fraction} of {len(rows):,} rows leaves no eval rows; raise "
            f"eval_fraction to at least {need:.3g}, set eval_fraction=0, or give eval_dataset.")
    if num_eval >= len(rows):
        raise DatasetError(
            f"eval_fraction={fraction} of {len(rows):,} rows leaves no training rows; lower "
            "eval_fraction or add more rows.")
    held_out = set(random.Random(seed).sample(range(len(rows)), num_eval))
    train = [r for i, r in enumerate(rows) if i not in held_out]
    return train, [r for i, r in enumerate(rows) if i in held_out]


# --- tables: rows plus where each row came from -----------------------------------------------


@dataclass
class _Table:
    rows: list[dict]
    description: str
    # Per row: (file, "line" | "item" | "row", number), so errors point where users can look.
    origins: list[tuple[str, str, int]] | None = None
    detail: str = ""  # e.g. "3 .jsonl files", shown in the summary

    def summary(self) -> str:
        """E.g. "data/train.jsonl (1,234 rows)"."""
        detail = f"{self.detail}, " if self.detail else ""
        return f"{self.description} ({detail}{len(self.rows):,} rows)"

    def folder(self, i: int) -> Path:
        """The folder of the file row `i` came from (image paths are relative to it)."""
        return Path(self.origins[i][0]).parent if self.origins else Path.cwd()

    def where(self, i: int) -> str:
        if self.origins is None:
            return f"{self.description} row {i + 1}"
        name, unit, number = self.origins[i]
        return f"{name} {unit} {number}"


def _read(source: str, config_name: str | None, split: str, split_key: str = "dataset_split") -> _Table:
    """Rows of a built-in, a local file or folder, or a hub dataset's `split` (`split_key` is
    the config key that names the split, for the error message)."""
    source = str(source).strip()
    if not source:
        raise DatasetError("dataset is empty; set dataset=path/to/train.jsonl, a hub id or "
                           "builtin:arith")
    if source.startswith("builtin:"):
        if source not in BUILTINS:
            raise DatasetError(f"unknown built-in dataset '{source}'; available: "
                               f"{', '.join(BUILTINS)}")
        return _Table(BUILTINS[source](), source, detail="generated offline")
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_file(path)
    if _looks_like_path(source):
        raise DatasetError(_not_found_message(path))
    return _read_hub(source, config_name, split, split_key)


def _is_local(source: str) -> bool:
    """A built-in or an existing file or folder (anything else is a hub id)."""
    source = str(source).strip()
    return source.startswith("builtin:") or Path(source).expanduser().exists()


def is_hub_id(source: str) -> bool:
    """Whether `source` names a hub dataset (to be downloaded), not a local file or a built-in."""
    return not _is_local(source) and not _looks_like_path(str(source).strip())


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else shaped like a path is a missing file.
    lower = source.lower()
    return (source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
            or lower.endswith(_FILE_LIKE))


def _not_found_message(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return (f"file not found: {path} (the folder {parent} does not exist; paths are "
                f"relative to {Path.cwd()})")
    siblings = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    close = difflib.get_close_matches(path.name, siblings, n=1)
    hint = f" Did you mean {parent / close[0]}?" if close else ""
    return f"file not found: {path} (paths are relative to {Path.cwd()}).{hint}"


# --- local files -------------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    """The table format of a file name: ".jsonl", ... or "" when unsupported."""
    name = path.name.lower().removesuffix(".gz")
    return next((ext for ext in SUPPORTED if name.endswith(ext)), "")


def _read_file(path: Path) -> _Table:
    fmt = _format_of(path)
    if not fmt or (fmt == ".parquet" and path.name.lower().endswith(".gz")):
        raise DatasetError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}'"
                           f"; supported: {SUPPORTED_HINT}")
    if fmt == ".parquet":
        rows, unit, numbers = _read_parquet(path), "row", None
    else:
        text = _decode(_read_bytes(path), path)
        parse = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv,
                 ".tsv": _parse_tsv}[fmt]
        rows, unit, numbers = parse(text, path)
    numbers = numbers or range(1, len(rows) + 1)
    origins = [(str(path), unit, n) for n in numbers]
    if not rows:
        raise DatasetError(f"{path} is empty (no rows); add prompts, one per row")
    return _Table(rows, str(path), origins)


def _read_folder(folder: Path) -> _Table:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and _format_of(p)]
    if not entries:
        raise DatasetError(f"the folder {folder} is empty; put data files in it "
                           f"({SUPPORTED_HINT}), or point dataset= at a file")
    if not files:
        found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:10])
        raise DatasetError(
            f"the folder {folder} has no data files (found: {found}); supported: "
            f"{SUPPORTED_HINT}. Subfolders are not searched: point dataset= at the folder "
            "that holds the files.")
    formats = sorted({_format_of(p) for p in files})
    if len(formats) > 1:
        raise DatasetError(
            f"the folder {folder} mixes file types ({', '.join(formats)}); all files in a "
            "dataset folder must have the same type, so move the others out or convert them.")
    rows: list[dict] = []
    origins: list[tuple[str, str, int]] = []
    for path in files:
        table = _read_file(path)
        rows += table.rows
        origins += table.origins or []
    return _Table(rows, f"{folder}/", origins, detail=f"{len(files)} {formats[0]} files")


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:  # permissions, a vanished network drive, ...
        raise DatasetError(f"could not read {path}: {err.strerror or one_line(err)}") from None
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DatasetError(f"{path} is not a valid gzip file ({one_line(err)}); "
                               "re-compress it or use the uncompressed file") from None
    return data


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a BOM is fine); anything else gets the position of the first bad byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{path} is UTF-16 text, not UTF-8; re-save it as UTF-8 (in Excel: "
                           "'CSV UTF-8'; in an editor: encoding UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetError(
            f"{path} is not valid UTF-8 text: byte 0x{data[err.start]:02x} at offset "
            f"{err.start} (line {line}). Re-save the file as UTF-8 (in Excel: 'CSV UTF-8'; or "
            f"`iconv -f latin1 -t utf-8 in > out`).") from None


def _split_lines(text: str) -> list[str]:
    # Not str.splitlines(): that also splits on U+2028 etc., which JSON strings may contain.
    return [line.removesuffix("\r") for line in text.split("\n")]


# Each parser returns (rows, unit, numbers): where each row starts, for error messages.
_Parsed = tuple[list[dict], str, list[int] | None]


def _parse_jsonl(text: str, path: Path) -> _Parsed:
    rows, lines = [], []
    for number, line in enumerate(_split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path} line {number} is not valid JSON: {err.msg} (column {err.colno}). "
                "Each line of a .jsonl file must be one complete JSON object such as "
                '{"prompt": "...", "answer": "..."}.') from None
        if not isinstance(value, dict):
            raise DatasetError(
                f"{path} line {number} is a JSON {type_name(value)}, not an object; each line "
                'must be one object such as {"prompt": "...", "answer": "..."}.')
        rows.append(value)
        lines.append(number)
    return rows, "line", lines


def _parse_json(text: str, path: Path) -> _Parsed:
    if not text.strip():
        return [], "item", None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values: maybe a JSON Lines file named .json
            try:
                return _parse_jsonl(text, path)
            except DatasetError:
                pass
        raise DatasetError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column "
                           f"{err.colno}.") from None
    if isinstance(value, dict):
        nested = [k for k, v in value.items() if isinstance(v, list) and v
                  and all(isinstance(x, dict) for x in v)]
        hint = (f" The rows seem to be under the key '{nested[0]}': save just that list, or "
                "convert the file to JSONL (one object per line)." if nested else "")
        raise DatasetError(
            f"{path} holds a JSON object (keys: {names(value)}), but a .json dataset must be a "
            f'list of row objects like [{{"prompt": "...", "answer": "..."}}, ...].{hint}')
    if not isinstance(value, list):
        raise DatasetError(f"{path} holds a JSON {type_name(value)}; a .json dataset must be "
                           'a list of row objects like [{"prompt": "...", "answer": "..."}].')
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DatasetError(
                f"{path}: item {i + 1} of the list is a JSON {type_name(item)}, not an object; "
                'every item must be a row object like {"prompt": "...", "answer": "..."}.')
    # Items of a pretty-printed list span many lines; "item N" is the useful position.
    return value, "item", None


def _parse_tsv(text: str, path: Path) -> _Parsed:
    return _parse_csv(text, path, delimiter="\t")


def _parse_csv(text: str, path: Path, delimiter: str = ",") -> _Parsed:
    # Prompts can be long; the csv module's default 128 KiB field limit would reject them.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return [], "line", None
        _check_header(header, path)
        rows, lines = [], []
        for record in reader:
            if not record:  # blank line
                continue
            if len(record) != len(header):
                raise DatasetError(
                    f"{path} line {reader.line_num} has {len(record)} fields but the header has "
                    f"{len(header)} ({names(header)}). Quote fields that contain "
                    f"'{delimiter}' or line breaks (\"like, this\"), or fix the row.")
            rows.append(dict(zip(header, record)))
            lines.append(reader.line_num)
    except csv.Error as err:
        raise DatasetError(f"{path} line {reader.line_num} is not valid CSV: {err}") from None
    if not rows:
        raise DatasetError(f"{path} has a header ({names(header)}) but no data rows; add "
                           "prompts below the header")
    return rows, "line", lines


def _check_header(header: list[str], path: Path) -> None:
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{path}: the header names column(s) {', '.join(duplicates)} more "
                           "than once; give every column a distinct name")


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # installed with `datasets`; imported late because it is slow

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DatasetError(
            f"{path} could not be read as Parquet ({one_line(err)}). Check that it is a "
            "complete Parquet file (re-export it, e.g. with pandas `df.to_parquet(...)`), or "
            "use JSONL or CSV.") from None


# --- the Hugging Face Hub -----------------------------------------------------------------------


def _read_hub(name: str, config_name: str | None, split: str, split_key: str) -> _Table:
    import datasets  # slow to import; only hub ids need it

    try:
        loaded = datasets.load_dataset(name, config_name, split=split)
    except Exception as err:  # network, auth, missing config/split: all reach the user the same way
        raise DatasetError(_hub_failure_message(name, config_name, split, split_key, err)) from None
    label = ", ".join(x for x in ("Hugging Face Hub", config_name, f"{split} split") if x)
    return _Table(loaded.to_list(), name, detail=label)


def _hub_failure_message(name: str, config_name: str | None, split: str, split_key: str,
                         err: Exception) -> str:
    reason = one_line(err)
    failed = f"could not load '{name}' from the Hugging Face Hub ({type(err).__name__}: {reason})."
    # The hub answered but the dataset needs a different configuration or split.
    if "config" in reason.lower():
        return f"{failed} Set dataset_config=<name> to one of the dataset's configurations."
    if "split" in reason.lower():
        return f"{failed} Set {split_key}=<name> to a split the dataset has (not '{split}')."
    return (
        f"{failed} No local file or folder named '{name}' exists (relative to {Path.cwd()}), so "
        "it was taken as a hub dataset id: check the spelling and your internet connection, "
        "or use a local file instead, e.g. dataset=data/train.jsonl (supported: "
        f"{SUPPORTED_HINT}).")


# --- mapping and validation ---------------------------------------------------------------------


def _prepare(table: _Table, config: TrainConfig, key: str) -> list[dict]:
    """Map a raw table to prompt rows, or raise naming the first bad row (and how many more)."""
    if not table.rows:
        raise DatasetError(f"{key} {table.description} has no rows")
    columns = _columns(table.rows)
    _check_columns(columns, config, table.description)
    out, problems = [], []
    for i, raw in enumerate(table.rows):
        row = {c: raw.get(c) for c in columns}  # every row gets every column, for rewards
        try:
            prompt = format_prompt(row, config)
            problem = _prompt_problem(prompt, config)
        except DatasetError as err:
            problem = str(err)
        images = vision.row_images(raw)
        if images is not None and not problem:
            try:
                row["images"] = [vision.load_image(image, table.folder(i), config.image_size, config.max_pixels)
                                 for image in images]
                prompt = vision.image_prompt(prompt, len(images))
            except DatasetError as err:
                problem = str(err)
        if problem:
            problems.append(f"{table.where(i)}: {problem}")
            continue
        if config.answer_column:
            # Built-in rewards read `answer`; the original column keeps its name too.
            row["answer"] = raw.get(config.answer_column)
        out.append({"prompt": prompt, **{c: v for c, v in row.items() if c != "prompt"}})
    if problems:
        more = f" ({len(problems) - 1} more rows have problems.)" if len(problems) > 1 else ""
        fix = "these rows" if len(problems) > 1 else "the row"
        raise DatasetError(f"{problems[0].rstrip('.')}.{more} Fix or remove {fix}.")
    _check_one_prompt_kind(out, table)
    return out


def _check_one_prompt_kind(rows: list[dict], table: _Table) -> None:
    """Plain-text and conversational prompts go through different paths (special tokens, the
    chat template, the completion form rewards receive), chosen once per batch; a file that
    mixes them is refused rather than treated by its first row."""
    kinds = [isinstance(row["prompt"], list) for row in rows]
    if any(kinds) and not all(kinds):
        first_other = next(i for i, kind in enumerate(kinds) if kind != kinds[0])
        what = "a conversation" if kinds[0] else "plain text"
        other = "plain text" if kinds[0] else "a conversation"
        raise DatasetError(
            f"{table.description} mixes plain-text and conversational prompts: {table.where(0)} is "
            f"{what}, {table.where(first_other)} is {other}. Use one kind for every row (wrap "
            'plain prompts as [{"role": "user", "content": ...}], or set prompt_template).')


def _check_columns(columns: list[str], config: TrainConfig, where: str) -> None:
    if config.prompt_template is None and config.prompt_column not in columns:
        raise DatasetError(f"{where}: " + _missing_column_message(
            "prompt", config.prompt_column, columns, _LIKELY_PROMPT_COLUMNS), key="prompt_column")
    if config.prompt_template is not None:
        try:  # checks the placeholders once, before any row
            fill_template(config.prompt_template, dict.fromkeys(columns, ""))
        except DatasetError as err:
            raise DatasetError(f"{where}: {err}", key="prompt_template") from None
    if config.answer_column and config.answer_column not in columns:
        raise DatasetError(f"{where}: " + _missing_column_message(
            "answer", config.answer_column, columns, _LIKELY_ANSWER_COLUMNS)
            + " If your rewards need no reference answer, set answer_column=null.", key="answer_column")


def _missing_column_message(kind: str, name: str, columns: list, likely: tuple) -> str:
    guess = difflib.get_close_matches(name, [str(c) for c in columns], n=1) or \
        [c for c in likely if c in columns][:1] or [str(c) for c in columns][:1]
    example = guess[0] if guess else "<column>"
    return (f"no {kind} column '{name}'. The columns are: {names(columns)}. Set "
            f"{kind}_column={example} (or the column that holds the {kind}).")


def _prompt_problem(prompt: Any, config: TrainConfig) -> str | None:
    """Why a formatted prompt is unusable, or None when it is fine."""
    source = "prompt_template" if config.prompt_template is not None else \
        f"prompt column '{config.prompt_column}'"
    if isinstance(prompt, str):
        if not prompt.strip():
            return f"the prompt is empty ({source} gives an empty string)"
        return _text_problem(prompt, "the prompt")
    if isinstance(prompt, list):
        return _conversation_problem(prompt)
    got = "is null (missing or empty)" if prompt is None else \
        f"holds a {type_name(prompt)} ({clip(repr(prompt), 40)})"
    return (f"{source} {got}, expected text or a conversation "
            '(a list of {"role": ..., "content": ...} messages)')


def _conversation_problem(messages: list) -> str | None:
    if not messages:
        return "the prompt is an empty conversation (no messages)"
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return (f"message {n} of the conversation is a {type_name(message)}; messages "
                    'must be {"role": ..., "content": ...} objects')
        for needed in ("role", "content"):
            if needed not in message:
                return (f"message {n} of the conversation has no '{needed}' "
                        f"(keys: {names(message)})")
        if message["role"] not in KNOWN_ROLES:
            return (f"message {n} has role {message['role']!r}; known roles: "
                    f"{', '.join(KNOWN_ROLES)}")
        problem = _content_problem(message["content"], n)
        if problem:
            return problem
    return None


def _content_problem(content: Any, n: int) -> str | None:
    """A message's content is text, or a list of parts: {"type": "text", "text": ...} and
    {"type": "image"} placeholders (the images themselves come from the image/images column)."""
    if isinstance(content, str):
        return _text_problem(content, f"message {n}")
    if not isinstance(content, list):
        return (f"message {n} content is a {type_name(content)}, expected text or a list of "
                '{"type": "text", "text": ...} and {"type": "image"} parts')
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            problem = _text_problem(part["text"], f"message {n}")
            if problem:
                return problem
        elif kind != "image":
            return (f"message {n} has a content part {clip(repr(part), 60)}; parts are "
                    '{"type": "text", "text": ...} or {"type": "image"}')
    return None


def _text_problem(text: str, what: str) -> str | None:
    """Text that cannot be written as UTF-8 (a lone surrogate such as "\\ud800", left by a broken
    JSON escape or a bad conversion) would fail at tokenisation or when logged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        return (f"{what} holds an invalid character U+{ord(bad):04X} at position {err.start} (a lone "
                "surrogate, usually a broken \\u escape); remove it or re-export the file as UTF-8")
    return None


# --- length filtering ---------------------------------------------------------------------------


def _filter_by_length(rows: list[dict], tokenizer, max_length: int,
                      key: str) -> tuple[list[dict], int]:
    """Drop rows whose prompt is longer than `max_length` tokens as the model sees it."""
    lengths = vision.prompt_lengths(tokenizer, [vision.model_prompt(r) for r in rows])  # image tokens included
    kept = [r for r, n in zip(rows, lengths) if n <= max_length]
    if not kept:
        raise DatasetError(
            f"every prompt in {key} is longer than max_prompt_length={max_length} tokens "
            f"(shortest {min(lengths)}, longest {max(lengths)} tokens, chat template included); "
            f"raise max_prompt_length (e.g. max_prompt_length={max(lengths)}) or shorten the "
            "prompts.")
    return kept, len(rows) - len(kept)


# --- small helpers ------------------------------------------------------------------------------


def _columns(rows: list[dict]) -> list[str]:
    """Column names in order of first appearance (JSONL rows may differ in their keys)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)
