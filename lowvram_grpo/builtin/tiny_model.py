"""The built-in tiny model: a real Qwen2 architecture, small enough to train on two CPU cores.

No hub is reachable offline, so `builtin:tiny` is built here: a character-level tokenizer made
with `tokenizers`, a Qwen2 model from a small config, and a short supervised warm-up on the toy
addition task. It is saved as an ordinary transformers checkpoint and then loaded by the same
`from_pretrained` + 4-bit path a real model takes, so the demo exercises the real code.

Why a warm-up: a freshly initialised tiny model has almost uniform logits, and LoRA on its
linear layers alone cannot make them peaked (the frozen embeddings and norms cap the logit
range), so a reward that needs a confident answer would stay flat. The warm-up teaches the
sums, but in its data only one answer in `WARMUP_COPIES` stops right after the sum; the others
ramble on with a stray digit ("3+5=" -> "84"). The warmed-up model therefore knows every answer
but usually spoils it, and the exact-answer reward starts low. Learning to stop after the
answer is one consistent behaviour across all prompts, which GRPO picks up within a minute,
so the demo's reward curve climbs visibly instead of crawling.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowvram_grpo.builtin import arith

# Bump when the recipe below changes, so stale cached models are rebuilt. (3: built on one
# thread, so that every machine and every caller builds the same weights.)
TINY_VERSION = 3
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
# A minimal chat format, so conversational datasets can be tried offline too.
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WARMUP_STEPS = 150
WARMUP_LR = 3e-3
WARMUP_COPIES = 4  # per problem: one clean answer, the rest followed by a stray digit


def default_cache_dir() -> Path:
    root = os.environ.get("LOWVRAM_GRPO_CACHE") or Path.home() / ".cache" / "lowvram_grpo"
    return Path(root)


def cached_model_path(name: str, build: Callable[[Path], Any], cache_dir: str | Path | None = None) -> Path:
    """The built-in model directory `name` in the cache, made by `build(path)` first if it is not
    there yet (the built-in models are built on first use, never downloaded)."""
    path = Path(cache_dir or default_cache_dir()) / name
    if not (path / "config.json").is_file():
        build(path)
    return path


def tiny_model_path(cache_dir: str | Path | None = None) -> Path:
    """Directory of the built-in tiny model, building it first if it is not there yet."""
    return cached_model_path(f"tiny-v{TINY_VERSION}", build_tiny_model, cache_dir)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(arith.ALPHABET) + CHAT_TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character; decoding glues them back together without spaces. The chat
    # markers are special tokens, matched whole before the split.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(CHAT_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", additional_special_tokens=CHAT_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Build, warm up and save the tiny model and its tokenizer to `path` (atomically)."""
    with single_threaded(seed):
        return save_atomically(Path(path), *_build())


@contextlib.contextmanager
def single_threaded(seed: int):
    """Seeded, on one thread, and without touching the caller's random stream.

    A private RNG: building the model on first use must not change the random stream of the
    training run that triggered it (resumed and fresh runs must sample the same). One thread:
    the warm-up's float sums, split across threads, round differently with each thread count,
    and after a few hundred updates the weights differ by up to 0.2, so the demo's curve
    depended on how many threads the process that first built the model happened to have."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def tiny_qwen2(tokenizer, max_positions: int):
    """The built-in text models' shape, randomly initialised: a 2-layer Qwen2 of width 128 over
    `tokenizer`'s vocabulary, untied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None))


def _build():
    tokenizer = build_tokenizer()
    model = tiny_qwen2(tokenizer, max_positions=64)
    _warm_up(model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_atomically(path: Path, model, tokenizer) -> Path:
    """Save to a temporary directory, then rename: a reader sees the whole model or none."""
    tmp = temporary_dir(path)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return move_into_place(tmp, path)


def temporary_dir(path: Path) -> Path:
    """Where to write what becomes `path` (see move_into_place): beside it, this process's own."""
    return path.with_name(path.name + f".tmp-{os.getpid()}")


def move_into_place(tmp: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first: theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _warm_up(model, tokenizer) -> None:
    """Supervised training on `a+b=` -> answer[stray digit]<eos>, loss on the completion only."""
    rng = random.Random(0)
    rows = []
    for row in arith.all_arith_rows():
        rows.append(row)
        rows += [{**row, "answer": row["answer"] + str(rng.randrange(10))} for _ in range(WARMUP_COPIES - 1)]
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    answers = [tokenizer(r["answer"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    supervised_warm_up(model, tokenizer.pad_token_id, [p + a for p, a in zip(prompts, answers)],
                       [[-100] * len(p) + a for p, a in zip(prompts, answers)], WARMUP_STEPS, WARMUP_LR)


def supervised_warm_up(model, pad_id: int, input_ids: list[list[int]], labels: list[list[int]], steps: int,
                       lr: float) -> None:
    """Full-batch supervised training (AdamW), loss on the labelled tokens only (-100: unlabelled);
    sequences right-padded with `pad_id`. What every built-in model's warm-up runs."""
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_id)
    targets = torch.full((len(input_ids), width), -100)
    attention = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, (row, row_labels) in enumerate(zip(input_ids, labels)):
        ids[i, :len(row)] = torch.tensor(row)
        targets[i, :len(row)] = torch.tensor(row_labels)
        attention[i, :len(row)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=attention, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
