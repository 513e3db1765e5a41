"""Tests for lowvram_grpo.data: loading every format, column mapping, prompts, and errors.

Everything is offline: files are written to tmp_path, the tokenizer is a character-level one
built in memory, and the hub is reached only through a monkeypatched `datasets.load_dataset`.
"""

from __future__ import annotations

import gzip
import json
import string

import pytest

from lowvram_grpo.config import ConfigError, TrainConfig, load_config
from lowvram_grpo.data import DatasetError, format_prompt, load_prompt_data, preview, read_table
from lowvram_grpo.prompts import prompt_text

ROWS = [{"question": "1+1?", "answer": "2", "level": "easy"},
        {"question": "2+3?", "answer": "5", "level": "easy"},
        {"question": "7*6?", "answer": "42", "level": "hard"}]

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


# --- helpers -----------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, sep=","):
    lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def config(dataset, **overrides) -> TrainConfig:
    overrides.setdefault("prompt_column", "question")
    return TrainConfig(dataset=str(dataset), **overrides)


def char_tokenizer(with_template: bool):
    """A character-level tokenizer: one token per printable ASCII character."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *string.printable])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    if with_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer():
    return char_tokenizer(with_template=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return char_tokenizer(with_template=False)


# --- loading each format -------------------------------------------------------------------------

WRITERS = {
    "train.jsonl": write_jsonl,
    "train.json": lambda p, rows: p.write_text(json.dumps(rows, indent=2), encoding="utf-8"),
    "train.csv": write_csv,
    "train.tsv": lambda p, rows: write_csv(p, rows, sep="\t"),
    "train.parquet": write_parquet,
    "train.jsonl.gz": lambda p, rows: p.write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_format_loads_the_same_rows(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, ROWS)
    assert read_table(str(path)) == ROWS
    data = load_prompt_data(config(path))
    assert [r["prompt"] for r in data.train] == ["1+1?", "2+3?", "7*6?"]
    assert data.source == f"{path} (3 rows)"
    assert data.eval == [] and data.num_dropped_too_long == 0


def test_folder_is_concatenated_in_name_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", ROWS[1:])
    write_jsonl(folder / "a.jsonl", ROWS[:1])
    (folder / "README.md").write_text("ignored: not a data file")
    assert read_table(str(folder)) == ROWS
    assert "2 .jsonl files, 3 rows" in load_prompt_data(config(folder)).source


def test_builtin_arith():
    data = load_prompt_data(TrainConfig(dataset="builtin:arith"))
    assert len(data.train) == 1000
    assert data.train[0].keys() == {"prompt", "answer"}
    assert data.train[0]["prompt"].endswith("=") and data.columns == ["answer"]


def test_json_file_holding_json_lines_is_read(tmp_path):
    path = write_jsonl(tmp_path / "train.json", ROWS)  # JSON Lines saved as .json
    assert read_table(str(path)) == ROWS


def test_csv_quoted_newlines_and_long_fields(tmp_path):
    long = "x" * 200_000  # beyond the csv module's default 128 KiB field limit
    path = tmp_path / "train.csv"
    path.write_text(f'question,answer\n"line one\nline two",1\n{long},2\n', encoding="utf-8")
    rows = read_table(str(path))
    assert rows[0]["question"] == "line one\nline two" and rows[1]["question"] == long


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "a\u2028b", "answer": "1"}\n', encoding="utf-8")
    assert read_table(str(path))[0]["question"] == "a\u2028b"


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("\ufeffquestion,answer\nhi,1\n".encode("utf-8"))
    assert read_table(str(path)) == [{"question": "hi", "answer": "1"}]


def test_preview_gives_columns_and_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    columns, rows = preview(str(path), n=2)
    assert columns == ["question", "answer", "level"] and rows == ROWS[:2]


# --- column mapping and prompt formatting --------------------------------------------------------


def test_column_mapping_renames_prompt_and_answer_and_keeps_the_rest(tmp_path):
    rows = [{"q": "1+1?", "sol": "2", "level": "easy"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_prompt_data(config(path, prompt_column="q", answer_column="sol"))
    assert data.train == [{"prompt": "1+1?", "q": "1+1?", "sol": "2", "level": "easy",
                           "answer": "2"}]
    assert set(data.columns) == {"q", "sol", "level", "answer"}


def test_answer_column_null_needs_no_answer(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "hi"}])
    data = load_prompt_data(config(path, answer_column=None))
    assert data.train == [{"prompt": "hi", "question": "hi"}]


def test_rows_missing_a_key_get_none_so_reward_columns_line_up(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "1", "x": 5},
                                                  {"question": "b", "answer": "2"}])
    assert load_prompt_data(config(path)).train[1]["x"] is None


def test_prompt_template_fills_columns_and_keeps_literal_braces():
    cfg = TrainConfig(prompt_template="{question}\nPut the answer in \\boxed{} ({{level}}).")
    prompt = format_prompt({"question": "1+1?", "answer": "2"}, cfg)
    assert prompt == "1+1?\nPut the answer in \\boxed{} ({level})."


def test_system_prompt_makes_a_conversation():
    cfg = TrainConfig(system_prompt="Be brief.", prompt_column="question")
    assert format_prompt({"question": "1+1?"}, cfg) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]


def test_system_prompt_prepended_to_a_conversation_once():
    cfg = TrainConfig(system_prompt="Be brief.", prompt_column="messages")
    user = [{"role": "user", "content": "hi"}]
    assert format_prompt({"messages": user}, cfg)[0]["role"] == "system"
    own = [{"role": "system", "content": "mine"}, *user]
    assert format_prompt({"messages": own}, cfg) == own


def test_conversation_prompt_through_a_chat_template(tmp_path, chat_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_prompt_data(config(path, prompt_column="messages", system_prompt="Add."),
                            chat_tokenizer)
    assert prompt_text(chat_tokenizer, data.train[0]["prompt"]) == \
        "<system>Add.\n<user>1+1?\n<assistant>"


def test_conversation_without_chat_template_is_a_clear_error(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DatasetError, match="no chat template") as err:
        load_prompt_data(config(path, system_prompt="Add."), plain_tokenizer)
    assert "system_prompt=null" in str(err.value)
    assert prompt_text(plain_tokenizer, "plain text") == "plain text"


# --- length filtering and the eval split ---------------------------------------------------------


def test_length_filter_drops_and_counts_long_prompts(tmp_path, plain_tokenizer):
    rows = [{"question": "x" * n, "answer": "1"} for n in (5, 10, 11, 30)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_prompt_data(config(path, max_prompt_length=10), plain_tokenizer)
    assert [len(r["prompt"]) for r in data.train] == [5, 10]
    assert data.num_dropped_too_long == 2
    # Without a tokenizer (the UI preview) nothing is filtered.
    assert len(load_prompt_data(config(path, max_prompt_length=10)).train) == 4


def test_chat_template_kwargs_reach_the_template(tmp_path):
    """chat_template_kwargs (e.g. Qwen3's enable_thinking) change the text every prompt becomes,
    in the length filter and the rollouts alike, since both go through prompt_text."""
    from lowvram_grpo.prompts import set_chat_template_kwargs

    tokenizer = char_tokenizer(with_template=True)
    tokenizer.chat_template = (CHAT_TEMPLATE + "{% if add_generation_prompt and enable_thinking is defined "
                               "and not enable_thinking %}<think></think>{% endif %}")
    prompt = [{"role": "user", "content": "hi"}]
    plain = prompt_text(tokenizer, prompt)
    set_chat_template_kwargs(tokenizer, {"enable_thinking": False})
    assert prompt_text(tokenizer, prompt) == plain + "<think></think>"
    assert load_config(overrides=["chat_template_kwargs={enable_thinking: false}"]).chat_template_kwargs == \
        {"enable_thinking": False}
    with pytest.raises(ConfigError, match="chat_template_kwargs: expected a mapping"):
        load_config(overrides=["chat_template_kwargs=[enable_thinking]"])


def test_length_filter_counts_the_chat_template(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "abc", "answer": "1"}])
    seen = len("<system>S\n<user>abc\n<assistant>")  # one token per character
    assert load_prompt_data(config(path, system_prompt="S", max_prompt_length=seen),
                            chat_tokenizer).train
    with pytest.raises(DatasetError) as err:
        load_prompt_data(config(path, system_prompt="S", max_prompt_length=seen - 1),
                         chat_tokenizer)
    assert f"shortest {seen}, longest {seen} tokens" in str(err.value)
    assert f"max_prompt_length={seen}" in str(err.value)


def bos_tokenizer():
    """Like Llama's: a BOS token before every plain-text encoding, one in the chat template."""
    from tokenizers import processors

    tokenizer = char_tokenizer(with_template=True)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.chat_template = "<s>" + CHAT_TEMPLATE
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


def test_length_filter_counts_the_tokens_generation_adds(tmp_path):
    """A plain prompt of exactly max_prompt_length characters becomes one token longer with
    the BOS that generation adds, so the filter drops it rather than generation cutting it."""
    from lowvram_grpo.rollout import tokenize_prompts

    tokenizer = bos_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "x" * n, "answer": "1"} for n in (9, 10)])
    data = load_prompt_data(config(path, max_prompt_length=10), tokenizer)
    assert [len(r["prompt"]) for r in data.train] == [9] and data.num_dropped_too_long == 1
    ids, cut = tokenize_prompts(tokenizer, [r["prompt"] for r in data.train], max_prompt_length=10)
    assert ids[0][0] == tokenizer.bos_token_id and len(ids[0]) == 10 and cut == 0
    # The chat template already holds the BOS: none is added on top.
    conversation = load_prompt_data(config(path, system_prompt="S", max_prompt_length=100), tokenizer).train
    ids, _ = tokenize_prompts(tokenizer, [conversation[0]["prompt"]], max_prompt_length=100)
    assert ids[0].count(tokenizer.bos_token_id) == 1


def test_eval_fraction_is_seeded_and_disjoint(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(100)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    first = load_prompt_data(config(path, eval_fraction=0.1, seed=1))
    again = load_prompt_data(config(path, eval_fraction=0.1, seed=1))
    other = load_prompt_data(config(path, eval_fraction=0.1, seed=2))
    assert (len(first.train), len(first.eval)) == (90, 10)
    assert first.eval == again.eval and first.eval != other.eval
    assert {r["prompt"] for r in first.train}.isdisjoint(r["prompt"] for r in first.eval)


def test_eval_dataset_uses_the_same_column_mapping(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"question": "9-1?", "answer": "8"}])
    data = load_prompt_data(config(train, eval_dataset=str(held_out)))
    assert data.eval == [{"prompt": "9-1?", "question": "9-1?", "answer": "8"}]
    assert "eval: " in data.source and str(held_out) in data.source


# --- the hub (monkeypatched: no network) ------------------------------------------------------


def test_unreachable_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prompts' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        read_table("someone/prompts")
    message = str(err.value)
    for words in ("could not load 'someone/prompts'", "Hugging Face Hub", "ConnectionError",
                  "No local file or folder", "dataset=data/train.jsonl"):
        assert words in message


def test_hub_dataset_rows_are_read(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config_name=None, split="train"):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_prompt_data(TrainConfig(dataset="someone/prompts", dataset_config="main",
                                        dataset_split="test", prompt_column="question"))
    assert calls == [("someone/prompts", "main", "test")]
    assert len(data.train) == 3 and "someone/prompts" in data.source


def test_hub_eval_split_of_the_training_dataset(monkeypatch):
    """openai/gsm8k's train split to train, its test split to evaluate: one hub id, two splits,
    the same dataset_config."""
    import datasets

    calls = []

    def fake_load(name, config_name=None, split="train"):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list(ROWS if split == "train" else ROWS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_prompt_data(TrainConfig(dataset="openai/gsm8k", dataset_config="main", prompt_column="question",
                                        eval_dataset="openai/gsm8k"))
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert len(data.train) == 3 and len(data.eval) == 1 and "test split" in data.source
    with pytest.raises(DatasetError, match="the same as dataset .* eval_split=<name>"):
        load_prompt_data(TrainConfig(dataset="openai/gsm8k", prompt_column="question",
                                     eval_dataset="openai/gsm8k", eval_split="train"))


def test_hub_missing_eval_split_names_eval_split(monkeypatch):
    import datasets

    def no_test_split(name, config_name=None, split="train"):
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", no_test_split)
    with pytest.raises(DatasetError) as err:
        load_prompt_data(TrainConfig(dataset="someone/a", eval_dataset="someone/b", prompt_column="question"))
    message = str(err.value)
    assert message.startswith("eval_dataset: ") and "Set eval_split=<name>" in message and "'test'" in message


def test_hub_missing_config_suggests_dataset_config(monkeypatch):
    import datasets

    def needs_config(*args, **kwargs):
        raise ValueError("Config name is missing. Pick one among the available configs: "
                         "['main', 'socratic']")

    monkeypatch.setattr(datasets, "load_dataset", needs_config)
    with pytest.raises(DatasetError) as err:
        read_table("openai/gsm8k")
    assert "socratic" in str(err.value) and "dataset_config=" in str(err.value)


# --- malformed inputs: one clear message each -----------------------------------------------------

GOOD = '{"question": "1+1?", "answer": "2"}\n'

# (case id, files to write {relative path: text or bytes}, config overrides, words expected).
# "dataset" defaults to the first file; "{tmp}" in an override is replaced by tmp_path.
MALFORMED = [
    ("jsonl bad line", {"d.jsonl": GOOD * 2 + '{"question": "x",}\n'}, {},
     ["line 3", "not valid JSON", "one complete JSON object"]),
    ("jsonl line not object", {"d.jsonl": GOOD + '["a", "b"]\n'}, {},
     ["line 2", "JSON list, not an object"]),
    ("json object with rows under a key", {"d.json": json.dumps({"data": ROWS})}, {},
     ["JSON object", "under the key 'data'", "list of row objects"]),
    ("json list of non-objects", {"d.json": '[{"question": "a"}, "b"]'}, {},
     ["item 2", "string, not an object"]),
    ("json syntax error", {"d.json": '[\n{"question": "a"\n]'}, {},
     ["not valid JSON", "line 3"]),
    ("json scalar", {"d.json": "42"}, {}, ["JSON number", "list of row objects"]),
    ("empty file", {"d.jsonl": ""}, {}, ["is empty", "no rows"]),
    ("csv header only", {"d.csv": "question,answer\n"}, {},
     ["header (question, answer)", "no data rows"]),
    ("csv ragged row", {"d.csv": "question,answer\na,1\nb,2,3\n"}, {},
     ["line 3", "3 fields", "header has 2", "Quote fields"]),
    ("csv duplicate header", {"d.csv": "question,question\na,b\n"}, {},
     ["question", "more than once"]),
    ("not utf-8", {"d.csv": "question,answer\ncaf\xe9,1\n".encode("latin-1")}, {},
     ["not valid UTF-8", "line 2", "offset 19", "Re-save the file as UTF-8"]),
    ("utf-16", {"d.csv": "question,answer\na,1\n".encode("utf-16")}, {},
     ["UTF-16", "re-save it as UTF-8"]),
    ("missing prompt column", {"d.jsonl": '{"problem": "a", "answer": "1"}\n'}, {},
     ["no prompt column 'question'", "problem, answer", "prompt_column=problem"]),
    ("missing answer column", {"d.jsonl": '{"question": "a", "solution": "1"}\n'}, {},
     ["no answer column 'answer'", "question, solution", "answer_column=solution",
      "answer_column=null"]),
    ("number in prompt column", {"d.jsonl": GOOD + '{"question": 17, "answer": "1"}\n'}, {},
     ["d.jsonl line 2", "prompt column 'question' holds a number (17)"]),
    ("null in prompt column", {"d.jsonl": GOOD + GOOD + '{"question": null, "answer": "1"}\n'},
     {}, ["d.jsonl line 3", "is null"]),
    ("prompt key missing in one row", {"d.jsonl": GOOD + '{"answer": "1"}\n'}, {},
     ["line 2", "is null (missing or empty)"]),
    ("empty prompt string", {"d.csv": 'question,answer\n"  ",1\n'}, {},
     ["d.csv line 2", "the prompt is empty"]),
    ("several bad rows counted", {"d.jsonl": '{"question": ""}\n' * 3}, {"answer_column": None},
     ["line 1", "2 more rows have problems"]),
    ("parquet null prompt", {"d.parquet": [{"question": "a"}, {"question": None}]},
     {"answer_column": None}, ["d.parquet row 2", "null"]),
    ("conversation with unknown role",
     {"d.jsonl": '{"question": [{"role": "bot", "content": "hi"}], "answer": "1"}\n'}, {},
     ["line 1", "role 'bot'", "system, user, assistant"]),
    ("conversation content not text",
     {"d.jsonl": '{"question": [{"role": "user", "content": 7}], "answer": "1"}\n'}, {},
     ["message 1 content is a number", "expected text or a list of"]),
    ("conversation content part not text or image",  # lists of typed parts are fine (images)
     {"d.jsonl": '{"question": [{"role": "user", "content": ["a"]}], "answer": "1"}\n'}, {},
     ["message 1 has a content part 'a'", '{"type": "image"}']),
    ("conversation message not an object",
     {"d.jsonl": '{"question": ["hello"], "answer": "1"}\n'}, {},
     ["message 1", "string", '{"role": ..., "content": ...}']),
    ("conversation message without content",
     {"d.jsonl": '{"question": [{"role": "user"}], "answer": "1"}\n'}, {},
     ["message 1", "no 'content'"]),
    ("empty conversation", {"d.jsonl": '{"question": [], "answer": "1"}\n'}, {},
     ["empty conversation"]),
    ("unknown template placeholder", {"d.jsonl": GOOD}, {"prompt_template": "{questoin}!"},
     ["{questoin}", "question, answer", "Did you mean {question}", "{{"]),
    ("null value used by template", {"d.jsonl": '{"question": null, "answer": "1"}\n'},
     {"prompt_template": "Q: {question}"}, ["line 1", "'question'", "null"]),
    ("unsupported extension", {"d.txt": "hello\n"}, {},
     ["unsupported file type '.txt'", ".jsonl, .json, .csv"]),
    ("file not found", {"train.jsonl": GOOD}, {"dataset": "{tmp}/trian.jsonl"},
     ["file not found", "trian.jsonl", "Did you mean", "train.jsonl"]),
    ("folder does not exist", {"train.jsonl": GOOD}, {"dataset": "{tmp}/nope/train.jsonl"},
     ["file not found", "does not exist"]),
    ("empty folder", {"data/.keep": ""}, {"dataset": "{tmp}/data"}, ["folder", "is empty"]),
    ("folder without data files", {"data/notes.md": "x", "data/sub/a.jsonl": GOOD},
     {"dataset": "{tmp}/data"}, ["no data files", "notes.md", "sub/", "Subfolders"]),
    ("folder mixing extensions", {"data/a.jsonl": GOOD, "data/b.csv": "question\na\n"},
     {"dataset": "{tmp}/data"}, ["mixes file types", ".csv, .jsonl"]),
    ("bad file inside a folder", {"data/a.jsonl": GOOD, "data/b.jsonl": "{oops\n"},
     {"dataset": "{tmp}/data"}, ["b.jsonl line 1", "not valid JSON"]),
    ("corrupt parquet", {"d.parquet": b"this is not parquet"}, {},
     ["could not be read as Parquet", "re-export"]),
    ("corrupt gzip", {"d.jsonl.gz": b"not gzip"}, {}, ["not a valid gzip"]),
    ("unknown builtin", {"d.jsonl": GOOD}, {"dataset": "builtin:arithmetic"},
     ["unknown built-in dataset", "builtin:arith"]),
    ("eval_fraction leaves no eval rows", {"d.jsonl": GOOD * 3}, {"eval_fraction": 0.1},
     ["eval_fraction=0.1 of 3 rows", "no eval rows", "at least 0.333"]),
    ("eval_fraction leaves no train rows", {"d.jsonl": GOOD * 3}, {"eval_fraction": 0.9},
     ["no training rows", "lower eval_fraction"]),
    ("eval_dataset missing prompt column",
     {"d.jsonl": GOOD, "e.jsonl": '{"q": "a", "answer": "1"}\n'},
     {"eval_dataset": "{tmp}/e.jsonl"}, ["eval_dataset: ", "e.jsonl", "no prompt column 'question'",
                                         "prompt_column=q"]),
    ("eval_dataset not found", {"d.jsonl": GOOD}, {"eval_dataset": "{tmp}/eval.jsonl"},
     ["file not found", "eval.jsonl"]),
    ("eval_dataset and eval_fraction", {"d.jsonl": GOOD, "e.jsonl": GOOD},
     {"eval_dataset": "{tmp}/e.jsonl", "eval_fraction": 0.5}, ["both set", "use one"]),
    ("eval_dataset same as dataset", {"d.jsonl": GOOD}, {"eval_dataset": "{tmp}/d.jsonl"},
     ["eval_dataset is the same as dataset", "eval_fraction"]),
]


@pytest.mark.parametrize("files, overrides, expected", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_input_gives_one_clear_message(tmp_path, files, overrides, expected):
    for relative, content in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            write_parquet(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    overrides = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) and "{tmp}" in v
                 else v for k, v in overrides.items()}
    overrides.setdefault("dataset", str(tmp_path / next(iter(files))))
    with pytest.raises(DatasetError) as err:
        load_prompt_data(config(**overrides))
    message = str(err.value)
    for words in expected:
        assert words in message, f"{words!r} not in: {message}"
    assert "\n" not in message, "messages are one paragraph"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_there_are_at_least_twenty_malformed_cases():
    assert len(MALFORMED) >= 20
