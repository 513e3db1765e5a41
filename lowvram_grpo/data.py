"""Prompt data: load a table, map its columns, validate it, split off an eval set.

(How a prompt becomes text and tokens, chat template included, is prompts.py; reading the
table itself, from files, folders, the Hub or a built-in, is tables.py.)

A dataset is a local file (JSONL, JSON, CSV/TSV, Parquet; text formats may be `.gz`), a folder
of such files, a Hugging Face Hub id, or `builtin:arith` (the offline toy task). Every row
becomes `{"prompt": ..., "answer": ..., <other columns>}`: the prompt is a string or a
conversation (`[{"role": ..., "content": ...}]`, TRL's conversational format) and the other
columns are passed to reward functions by name, as TRL does.

Users hit data problems before anything else, so every problem becomes one `DatasetError`
whose single-paragraph message names the file, the line or row, and the fix (tables.py keeps
where each row came from for that). The user's files are only ever read.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, field
from typing import Any

from lowvram_grpo import vision
from lowvram_grpo.config import TrainConfig
from lowvram_grpo.errors import DatasetError, clip, names, type_name
from lowvram_grpo.prompts import fill_template, with_system_prompt
from lowvram_grpo.tables import BUILTIN_TEST_SPLITS, _is_local, _read, _Table

# Roles a conversation may use; anything else is almost always a typo ("bot", "human").
KNOWN_ROLES = ("system", "user", "assistant", "tool")

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
