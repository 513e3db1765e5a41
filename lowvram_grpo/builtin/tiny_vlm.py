"""Tiny image-text models of real architectures, and the processors that go with them, built offline.

No checkpoint can be downloaded here, so the vision tests and the vision demo build their models
from transformers' own config classes (Qwen2.5-VL, Qwen3-VL, Gemma 3), scaled down to a few
layers and small widths, with a character tokenizer that knows each architecture's image tokens
and a minimal chat template that renders `{"type": "image"}` parts the way the real template
does. Saved with `save_pretrained`, they load through the same AutoProcessor +
AutoModelForImageTextToText path a hub checkpoint takes.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
QWEN_IMAGE_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
GEMMA_IMAGE_TOKENS = ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]
ALPHABET = string.digits + string.ascii_lowercase + " +=?.,\n"
VOCAB_SIZE = 96  # room above the tokenizer's ids; never produced

# How each architecture writes an image into the text: the processor then expands the image
# token to one per vision token.
IMAGE_MARKUP = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>"}
ARCHITECTURES = tuple(IMAGE_MARKUP)


def chat_template(kind: str) -> str:
    return ("{% for message in messages %}<|{{ message['role'] }}|>{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
            + IMAGE_MARKUP[kind] + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
            "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(kind: str):
    """One token per character, plus the chat markers and the architecture's image tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    image_tokens = GEMMA_IMAGE_TOKENS if kind == "gemma3" else QWEN_IMAGE_TOKENS
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(ALPHABET) + CHAT_TOKENS + image_tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(CHAT_TOKENS + image_tokens)
    named = ({"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
             if kind == "gemma3" else
             {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left",
        extra_special_tokens=named)
    tokenizer.chat_template = chat_template(kind)
    return tokenizer


def build_processor(kind: str, tokenizer, image_size: int):
    """The architecture's processor for square images of `image_size` pixels."""
    import transformers

    from lowvram_grpo.vision import image_only

    if kind == "gemma3":
        image_processor = transformers.Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
        return transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=tokenizer.chat_template, image_seq_length=4)
    patch = 16 if kind == "qwen3_vl" else 14
    pixels = image_size * image_size
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, size={"shortest_edge": pixels, "longest_edge": pixels})
    processor_class = transformers.Qwen3VLProcessor if kind == "qwen3_vl" else transformers.Qwen2_5_VLProcessor
    return image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                       chat_template=tokenizer.chat_template)


def tiny_config(kind: str, tokenizer, hidden: int = 64, layers: int = 2):
    """The architecture's real config class, scaled down: `layers` decoder layers of width
    `hidden`, a one- or two-block vision tower; what makes the architecture is kept (M-RoPE
    sections, Qwen3-VL's deepstack, Gemma 3's sliding layers and pooled image tokens)."""
    from transformers import Gemma3Config, Qwen2_5_VLConfig, Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    head_dim = hidden // 4
    if kind == "gemma3":
        return Gemma3Config(
            text_config={**text, "head_dim": head_dim, "sliding_window": 4, "query_pre_attn_scalar": head_dim,
                         "layer_types": (["sliding_attention"] * (layers - 1) + ["full_attention"])},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"), pad_token_id=tokenizer.pad_token_id)
    # M-RoPE: the rotary dimensions (head_dim / 2) split between time, height and width.
    sections = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    image_ids = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                     vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if kind == "qwen3_vl":
        return Qwen3VLConfig(
            text_config={**text, "head_dim": head_dim,
                         "rope_scaling": {"rope_type": "default", "mrope_section": sections, "mrope_interleaved": True}},
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               deepstack_visual_indexes=[0], num_position_embeddings=16),
            **image_ids)
    return Qwen2_5_VLConfig(
        text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": sections}},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        **image_ids)


# Square images of this size give each architecture 4 vision tokens (a 2x2 grid after merging or pooling).
IMAGE_SIZES = {"qwen2_5_vl": 56, "qwen3_vl": 64, "gemma3": 28}


def build_tiny_vlm(kind: str, path: str | Path, seed: int = 0, **config_kwargs):
    """Save a tiny random `kind` model with its tokenizer and processor to `path`; returns
    (model, processor)."""
    from transformers import AutoModelForImageTextToText

    tokenizer = build_tokenizer(kind)
    processor = build_processor(kind, tokenizer, IMAGE_SIZES[kind])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(tiny_config(kind, tokenizer, **config_kwargs))
        # Gemma 3 initialises its image projection to zeros (a real checkpoint's is trained): as
        # built, the model would not see its images at all.
        for name, param in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                torch.nn.init.normal_(param, std=param.size(0) ** -0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


# --- the vision demo's model: builtin:tiny-vision ------------------------------------------------

# Bump when the recipe below changes, so stale cached models are rebuilt.
TINY_VISION_VERSION = 1
DEMO_KIND = "qwen2_5_vl"
WARMUP_ROWS = 128
WARMUP_STEPS = 35
WARMUP_LR = 2e-3


def tiny_vision_model_path(cache_dir: str | Path | None = None) -> Path:
    """Directory of the built-in tiny image-text model, building it first if it is not there yet."""
    from lowvram_grpo.builtin.tiny_model import cached_model_path

    return cached_model_path(f"tiny-vision-v{TINY_VISION_VERSION}", build_demo_model, cache_dir)


def build_demo_model(path: str | Path, seed: int = 0, warmup_steps: int = WARMUP_STEPS) -> Path:
    """A tiny Qwen2.5-VL, warmed up briefly on the squares task, saved to `path` (atomically).
    Built on one thread with a private random state, like the text demo's model (tiny_model.py)."""
    from lowvram_grpo.builtin.tiny_model import move_into_place, single_threaded, temporary_dir

    path = Path(path)
    tmp = temporary_dir(path)
    with single_threaded(seed):
        model, processor = build_tiny_vlm(DEMO_KIND, tmp, seed=seed)  # writes the processor there too
        _warm_up(model, processor, warmup_steps)
        model.save_pretrained(tmp)
    return move_into_place(tmp, path)


def warmup_batch(processor, rows: list[dict]) -> dict:
    """The squares rows as one supervised batch: prompt + answer + EOS, loss on the answer only.
    (Every prompt has the same text and one image of the same size, so no padding is needed.)"""
    from lowvram_grpo import vision

    tokenizer = processor.tokenizer
    vision.attach_processor(tokenizer, processor)
    prompts = [vision.with_images(vision.image_prompt(r["prompt"], 1), [r["image"]]) for r in rows]
    ids, inputs = vision.encode_image_prompts(tokenizer, prompts)
    answers = [tokenizer(r["answer"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    input_ids = torch.tensor([p + a for p, a in zip(ids, answers)])
    labels = input_ids.clone()
    labels[:, :len(ids[0])] = -100
    extra = vision.forward_inputs(inputs, [len(p) for p in ids], len(ids[0]), len(answers[0]))
    return {"input_ids": input_ids, "labels": labels, **extra}


def _warm_up(model, processor, steps: int) -> None:
    """A few full-batch steps on the squares task: enough to answer with one digit and stop, and
    to count better than chance, not well; GRPO does the rest (see bench/vision_demo.py)."""
    from lowvram_grpo.builtin.squares import squares_rows

    batch = warmup_batch(processor, squares_rows(WARMUP_ROWS, seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
