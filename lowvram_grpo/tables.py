"""Reading a dataset's rows: a local file (JSONL, JSON, CSV/TSV, Parquet; text formats may be
`.gz`), a folder of such files, a Hugging Face Hub id, or a `builtin:` task, each row with
where it came from (file and line), so that data.py's errors can point there.

Local text files are parsed with plain Python (json, csv) rather than `datasets` precisely so
that the messages can name a line number. The user's files are only ever read.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowvram_grpo.builtin import arith, calculator, code_tasks, guess_number, squares
from lowvram_grpo.errors import DatasetError, names, one_line, type_name

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

# Extensions that mark a string as a file path even when no such file exists (hub ids may
# contain dots, so only extensions that a dataset id would never end with count).
_FILE_LIKE = SUPPORTED + (".gz", ".txt", ".xlsx", ".xls", ".zip", ".arrow", ".yaml", ".yml")


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
