"""Property and fuzz tests, bounded to run in CI in well under a minute.

- Any JSON-serialisable record, with any text, round-trips through the run directory's
  append, read and truncate.
- Random bytes and random JSON in every supported dataset format give rows or one
  DatasetError, never another exception.
- Random `key=value` overrides give a config or one ConfigError.
"""

import csv
import gzip
import io
import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowvram_grpo import rundir
from lowvram_grpo.config import ALIASES, ConfigError, RewardSpec, TrainConfig, load_config, save_config
from lowvram_grpo.data import DatasetError, read_prompt_rows


def bounded(examples: int) -> settings:
    """A fixed number of examples, the same ones every run (derandomize): CI stays fast and a
    failure reproduces."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# Any text a JSON string can hold and UTF-8 can write (surrogates cannot be written as UTF-8).
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12)
records = st.lists(st.fixed_dictionaries({"step": st.integers(0, 20)},
                                         optional={"prompt": any_text, "completion": any_text,
                                                   "rewards": st.dictionaries(any_text, json_values, max_size=3),
                                                   "extra": json_values}),
                   max_size=8)


@bounded(100)
@given(records=records, keep_up_to=st.integers(0, 20))
def test_any_record_round_trips_through_append_read_and_truncate(tmp_path_factory, records, keep_up_to):
    path = tmp_path_factory.mktemp("jsonl") / "completions.jsonl"
    for record in records:
        rundir.append_jsonl(path, record)
    assert rundir.read_jsonl(path) == records
    rundir.truncate_jsonl_after_step(path, keep_up_to)
    assert rundir.read_jsonl(path) == [r for r in records if r["step"] <= keep_up_to]


# --- datasets ----------------------------------------------------------------------------------

FORMATS = [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".csv.gz"]


def _load(path) -> None:
    """Rows or one DatasetError; anything else fails the test."""
    config = load_config(preset="tiny-cpu", overrides={"dataset": str(path)})
    try:
        rows = read_prompt_rows(config)
    except DatasetError as err:
        assert str(err).strip()
        return
    assert rows.train and all("prompt" in row for row in rows.train)


def _as_text(value, suffix: str) -> bytes:
    """`value` written as a file of the given format would hold it."""
    if suffix.startswith(".jsonl"):
        items = value if isinstance(value, list) else [value]
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    elif suffix.startswith(".json"):
        text = json.dumps(value, ensure_ascii=False)
    else:  # csv/tsv: a header from the first dict's keys, cells as text
        items = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, dict)]
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t" if suffix.startswith(".tsv") else ",")
        if items:
            writer.writerow(list(items[0]))
            for item in items:
                writer.writerow([str(v) for v in item.values()])
        text = out.getvalue()
    data = text.encode("utf-8")
    return gzip.compress(data) if suffix.endswith(".gz") else data


@bounded(60)
@given(data=st.binary(max_size=300), suffix=st.sampled_from(FORMATS))
def test_random_bytes_in_any_format_give_rows_or_a_dataset_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("data") / f"data{suffix}"
    path.write_bytes(data)
    _load(path)


rows_like = st.lists(st.dictionaries(st.sampled_from(["prompt", "answer", "question", "x", ""]), json_values,
                                     max_size=4), max_size=5)


@bounded(80)
@given(value=rows_like | json_values, suffix=st.sampled_from([f for f in FORMATS if f != ".parquet"]))
def test_random_json_in_any_text_format_gives_rows_or_a_dataset_error(tmp_path_factory, value, suffix):
    path = tmp_path_factory.mktemp("data") / f"data{suffix}"
    path.write_bytes(_as_text(value, suffix))
    _load(path)


@bounded(30)
@given(value=rows_like)
def test_random_tables_as_parquet_give_rows_or_a_dataset_error(tmp_path_factory, value):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("data") / "data.parquet"
    columns = sorted({key for row in value for key in row}) or ["prompt"]
    # Parquet columns have one type: store each value as JSON text, or as itself when all are text.
    table = {c: [row.get(c) if isinstance(row.get(c), str) else json.dumps(row.get(c)) for row in value]
             for c in columns}
    pq.write_table(pyarrow.table(table), path)
    _load(path)


# --- overrides ---------------------------------------------------------------------------------

keys = st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()] + list(ALIASES)) | \
    st.text(string.ascii_letters + "_", min_size=1, max_size=12)
raw_values = st.sampled_from(["", "0", "-1", "1e-3", "1e", "true", "null", "none", "auto", "[a, b]", "{a: 1}",
                              "[{name: arith_answer, weight: x}]", "2020-01-01", "'quoted", "[", "{", "!!str",
                              "1.5", "nan", ".inf", "8", "[q_proj]", "{name: exact_answer}", "~"]) | \
    st.text(string.printable, max_size=12)


@bounded(300)
@given(overrides=st.lists(st.tuples(keys, raw_values), max_size=4))
def test_random_overrides_give_a_config_or_a_config_error(tmp_path_factory, overrides):
    try:
        config = load_config(preset="tiny-cpu", overrides=[f"{key}={value}" for key, value in overrides])
    except ConfigError as err:
        assert str(err)
        return
    # What the overrides imply: each overridden key holds its last value, every other key the
    # preset's, and the config.yaml a run saves loads back as the same config.
    given = {ALIASES.get(key, key): raw for key, raw in overrides}
    preset = load_config(preset="tiny-cpu")
    for name in TrainConfig.__dataclass_fields__:
        if name in given:
            assert _holds(getattr(config, name), _yaml(given[name])), (name, given[name], getattr(config, name))
        else:
            assert _same(getattr(config, name), getattr(preset, name)), name
    saved = tmp_path_factory.mktemp("config") / "config.yaml"
    save_config(config, saved)
    assert _same(load_config(config_path=saved).to_dict(), config.to_dict())


def _yaml(raw: str):
    """An override's value as the CLI reads it: YAML, or the text itself where that is not YAML."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _holds(typed, given) -> bool:
    """Whether a field's typed value is the value the override gave (a number may come as text,
    e.g. YAML reads 1e-3 as a string; a reward as a name or a {name, weight, args} mapping)."""
    if isinstance(typed, list) and typed and isinstance(typed[0], RewardSpec):
        given = given if isinstance(given, list) else [given]
        return [spec.name for spec in typed] == [g if isinstance(g, str) else g["name"] for g in given]
    if isinstance(typed, float):
        return _same(typed, float(given))
    if isinstance(typed, str) and not isinstance(given, str):
        return typed == str(given)
    return typed == given and type(typed) is type(given)


def _same(a, b) -> bool:
    """Equal, NaN counting as equal to NaN (nan is a valid value of some keys)."""
    return a == b or yaml.safe_dump(a) == yaml.safe_dump(b)
