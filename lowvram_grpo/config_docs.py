"""The config keys described from their one source, TrainConfig's field metadata (config.key):
the groups of the app's form, `lowvram-grpo keys`, and the README's key table.

Every field must carry a help and a group; `describe_keys` refuses one that does not, so a key
added without them fails the tests (tests/test_config_docs.py) rather than showing up blank.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from lowvram_grpo.config import RewardSpec, TrainConfig

README_MARKERS = ("<!-- config-keys:start -->", "<!-- config-keys:end -->")


@dataclass(frozen=True)
class KeyDoc:
    name: str
    type: str  # as a person reads it: "int or auto", "nf4/none", "text or null"
    default: str  # as YAML would write it
    group: str
    help: str


def describe_keys() -> list[KeyDoc]:
    """Every TrainConfig key, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    docs = []
    for f in dataclasses.fields(TrainConfig):
        missing = [part for part in ("help", "group") if not f.metadata.get(part)]
        if missing:
            raise TypeError(f"TrainConfig.{f.name} has no {' or '.join(missing)}: declare it with "
                            "key(default, group, help) (config.py)")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        docs.append(KeyDoc(f.name, type_text(hints[f.name]), default_text(default), f.metadata["group"],
                           " ".join(f.metadata["help"].split())))
    return docs


def grouped_keys() -> dict[str, list[KeyDoc]]:
    """The groups in the order their first key is declared, each with its keys."""
    groups: dict[str, list[KeyDoc]] = {}
    for doc in describe_keys():
        groups.setdefault(doc.group, []).append(doc)
    return groups


def key_groups() -> list[tuple[str, list[str]]]:
    """(group, key names) in that order: the app's form."""
    return [(group, [doc.name for doc in docs]) for group, docs in grouped_keys().items()]


def key_help(name: str) -> str:
    return TrainConfig.__dataclass_fields__[name].metadata["help"]


def type_text(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin is Literal:
        return "/".join(map(str, args))
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return "mapping"
    return {str: "text", int: "int", float: "float", bool: "bool", RewardSpec: "reward"}.get(hint, str(hint))


def default_text(value: Any) -> str:
    """A default as it would be written in a config file (a reward with weight 1 by its name)."""
    if isinstance(value, list) and value and all(isinstance(v, RewardSpec) for v in value):
        value = [v.name if v.weight == 1.0 and not v.args else dataclasses.asdict(v) for v in value]
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(value) + "]"
    return json.dumps(value)  # null, true/false, numbers, {}


def keys_text(width: int = 100) -> str:
    """`lowvram-grpo keys`: each group, then each key with its type, default and help."""
    lines = []
    for group, docs in grouped_keys().items():
        lines.append(f"{group}:")
        for doc in docs:
            lines.append(f"  {doc.name} ({doc.type}, default {doc.default})")
            lines += textwrap.wrap(doc.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def keys_markdown() -> str:
    """The README's key table: one table per group."""
    parts = []
    for group, docs in grouped_keys().items():
        rows = [f"| `{d.name}` | {_cell(d.type)} | `{_cell(d.default, code=True)}` | {_cell(d.help)} |"
                for d in docs]
        parts.append("\n".join([f"**{group}**", "", "| key | type | default | what it does |",
                                "| --- | --- | --- | --- |", *rows]))
    return "\n\n".join(parts) + "\n"


def _cell(text: str, code: bool = False) -> str:
    """Text for a table cell: a `|` would end the cell, a `<think>` outside code would be HTML."""
    text = text.replace("|", "\\|")
    return text if code else text.replace("<", "&lt;")
