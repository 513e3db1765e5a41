"""Config help has one source: each TrainConfig field's metadata. The app's form groups,
`lowvram-grpo keys` and the README's key table are all made from it, and agree.

The README's table is regenerated with:
    UPDATE_README=1 python -m pytest tests/test_config_docs.py
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from lowvram_grpo import cli, config_docs
from lowvram_grpo.app import setup as app_setup
from lowvram_grpo.config import TrainConfig, key

README = Path(__file__).resolve().parent.parent / "README.md"
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _readme_table(text: str) -> tuple[int, int]:
    start, end = config_docs.README_MARKERS
    return text.index(start) + len(start), text.index(end)


def test_every_key_has_help_and_a_group():
    assert len(FIELDS) > 90
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"].strip() and f.metadata["group"].strip(), f.name
    docs = {d.name: d for d in config_docs.describe_keys()}
    assert list(docs) == FIELDS
    assert docs["generation_chunk_size"].type == "int or auto"
    assert docs["loss_type"].type == "grpo/dr_grpo/dapo/bnpo/cispo/sapo/luspo/vespo"
    assert (docs["rewards"].default, docs["vram_gb"].default, docs["report_to"].default) == ("[arith_answer]", "null", "[]")
    assert docs["temperature"].group == "generation (rollouts)"


def test_a_key_without_help_is_refused():
    """The guard that keeps a new key from showing up blank everywhere."""
    @dataclasses.dataclass
    class Bare(TrainConfig):
        extra: int = 1

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_docs, "TrainConfig", Bare)
        with pytest.raises(TypeError, match=r"TrainConfig.extra has no help or group: declare it with key\("):
            config_docs.describe_keys()


def test_key_gives_each_config_its_own_list():
    @dataclasses.dataclass
    class Two:
        items: list[str] = key(["a"], "g", "some items")

    first, second = Two(), Two()
    first.items.append("b")
    assert second.items == ["a"] and dataclasses.fields(Two)[0].metadata == {"help": "some items", "group": "g"}


def test_the_app_groups_hold_every_key_exactly_once():
    groups = config_docs.key_groups()
    grouped = [name for _, names in groups for name in names]
    assert sorted(grouped) == sorted(FIELDS) and len(grouped) == len(set(grouped))
    titles = [title for title, _ in groups]
    known = ["model", "data", "rewards", "generation (rollouts)", "GRPO objective", "optimisation", "output"]
    assert [title for title in titles if title in known] == known  # in declaration order; new groups may join
    # The form shows each of them once (the rewards slots and the run name stand for two keys).
    assert sorted(app_setup.CONFIG_KEYS) == sorted(set(FIELDS) - set(app_setup.NOT_IN_FORM))


def test_keys_command_lists_every_key_with_type_default_and_help(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for doc in config_docs.describe_keys():
        assert f"  {doc.name} ({doc.type}, default {doc.default})\n" in out
        assert doc.help.split()[-1] in out  # the help is there, wrapped
    assert "generation (rollouts):\n  num_generations (int, default 8)\n      G: completions per prompt" in out


def test_the_readme_key_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    start, end = _readme_table(text)
    generated = "\n" + config_docs.keys_markdown()
    if os.environ.get("UPDATE_README") == "1":
        README.write_text(text[:start] + generated + text[end:], encoding="utf-8")
        text = README.read_text(encoding="utf-8")
        start, end = _readme_table(text)
    assert text[start:end] == generated, ("the README's key table is not config.py's: regenerate it with "
                                          "UPDATE_README=1 python -m pytest tests/test_config_docs.py")
    for name in FIELDS:
        assert f"| `{name}` |" in text[start:end]
