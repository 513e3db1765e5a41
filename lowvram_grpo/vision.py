"""Images in prompts: reading and checking them, the processor, and the extra forward inputs.

A dataset row may carry an `image` column (one image) or an `images` column (a list), as TRL
takes them. An image is a path (relative to the dataset file), an http(s) URL (fetched only
when online), raw bytes any PIL format, a hub dataset's Image feature ({"bytes", "path"}) or
a PIL image. Every image is opened, checked and converted to RGB when the data loads, before
the model, so that a missing file or a corrupt image costs seconds and one line naming the row.

The prompt then becomes a conversation whose first user message starts with one
`{"type": "image"}` placeholder per image (TRL's `prepare_multimodal_messages`); the rows keep
the placeholders (JSON-friendly, for logging) and their images under "images". The processor
(`AutoProcessor`) turns a prompt with its images into token ids with the image tokens expanded
plus the model's image inputs (pixel_values, image_grid_thw, token_type_ids, ...).

Each prompt is processed once; its G sequences share the one `ImageInputs` object, and a
batch of sequences (a generation chunk, a log-prob micro-batch) gets its forward inputs from
`forward_inputs`: the image fields concatenated row by row, the per-token fields padded like
the token ids. Where the model takes pre-encoded images (transformers' `mm_encoder_outputs`:
Qwen2.5-VL, Qwen3-VL, Gemma 3...), `encode_images` runs the vision tower once per prompt and
every later forward of the step (generation, reference and old log-probs, the update) reuses
those features: the tower is frozen and has no adapter, so they are the same every time.
"""

from __future__ import annotations

import inspect
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowvram_grpo.errors import DatasetError, one_line, type_name

IMAGE_COLUMNS = ("image", "images")
# Where the tokenizer keeps the model's processor (see attach_processor): the tokenizer is what
# reaches every place a prompt becomes tokens.
_PROCESSOR = "_lowvram_grpo_processor"
# Larger images are refused: decoding one takes more memory than the model. PIL's own
# decompression-bomb limit is twice this.
MAX_IMAGE_PIXELS = 89_478_485
# Image modes that convert to RGB without losing what the picture shows.
CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "I;16", "I;16B", "I;16L")


# --- reading and checking images ---------------------------------------------------------------


def row_images(row: dict) -> list | None:
    """The raw image values of a row (`images` list or one `image`), or None without images."""
    if row.get("images") is not None:
        value = row["images"]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if row.get("image") is not None:
        return [row["image"]]
    return None


def load_image(value: Any, base_dir: Path, image_size: int | None = None, max_pixels: int | None = None):
    """One image as an RGB PIL image, shrunk to `image_size` (longest side) and `max_pixels`.
    Raises DatasetError with the problem and the fix (the caller adds the row)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        image = value
    else:
        data, name = _image_bytes(value, base_dir)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = _checked_size(opened, name)
                image.load()
        except UnidentifiedImageError:
            raise DatasetError(f"{name} is not an image PIL can read (corrupt, or not an image file); "
                               "replace it with a PNG or JPEG") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetError(f"{name} could not be decoded ({one_line(err)}); re-save it as PNG or JPEG") from None
    image = _checked_size(image, "the image")
    if image.mode not in CONVERTIBLE_MODES:
        raise DatasetError(f"the image has mode {image.mode} (e.g. 32-bit integer or float pixels), which has no "
                           "RGB meaning; convert it to 8-bit RGB or greyscale")
    image = image.convert("RGB")
    return shrink(image, image_size, max_pixels)


def _image_bytes(value: Any, base_dir: Path) -> tuple[bytes, str]:
    if isinstance(value, dict):  # a datasets Image feature, not decoded: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"]), f"image {value.get('path') or '(bytes)'}"
        if value.get("path"):
            value = value["path"]
        else:
            raise DatasetError("the image is an object without 'bytes' or 'path'; give a path, bytes or an "
                               "Image feature")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "the image bytes"
    if not isinstance(value, str):
        raise DatasetError(f"the image is a {type_name(value)}; give a file path (relative to the dataset "
                           "file), a URL, image bytes or a datasets Image feature")
    if value.startswith(("http://", "https://")):
        return _download(value), value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise DatasetError(f"image file {path} not found (image paths are relative to the dataset file's "
                           f"folder, {base_dir})")
    return path.read_bytes(), f"image file {path}"


def _download(url: str, timeout: float = 10.0) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except Exception as err:  # offline, 404, timeout: the user needs the reason only
        raise DatasetError(f"image URL {url} could not be fetched ({one_line(err)}); download the images and "
                           "give their paths when offline") from None


def _checked_size(image, name: str):
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{name} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; "
                           "shrink it before training (max_pixels only shrinks images that could be read)")
    if width < 1 or height < 1:
        raise DatasetError(f"{name} is empty ({width}x{height} pixels)")
    return image


def shrink(image, image_size: int | None = None, max_pixels: int | None = None):
    """The image shrunk (never enlarged), keeping its aspect ratio, so that its longest side is at
    most `image_size` and its area at most `max_pixels`. Vision tokens grow with the area."""
    from PIL import Image

    width, height = image.size
    scale = 1.0
    if image_size:
        scale = min(scale, image_size / max(width, height))
    if max_pixels:
        scale = min(scale, (max_pixels / (width * height)) ** 0.5)
    if scale >= 1.0:
        return image
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def thumbnail(image, size: int = 64) -> str:
    """A small PNG of `image` as a data: URI: what the app's tables and completions.jsonl show,
    so that a run directory carries its pictures without copying the dataset's files."""
    import base64

    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnails_markdown(uris: list[str]) -> str:
    """Markdown that shows the thumbnails in a table cell."""
    return " ".join(f"![image]({uri})" for uri in uris)


def image_prompt(prompt: str | list[dict], num_images: int) -> list[dict]:
    """The prompt as a conversation with image placeholders, as TRL's prepare_multimodal_messages
    makes it: text parts, and one {"type": "image"} per image before the first user message's text
    (unless the prompt already places its own)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    placed = sum(part.get("type") == "image" for m in messages if isinstance(m["content"], list)
                 for part in m["content"])
    if placed and placed != num_images:
        raise DatasetError(f"the prompt has {placed} image placeholders but the row has {num_images} images; "
                           "give one {\"type\": \"image\"} part per image, or none to put them all first")
    out, inserted = [], bool(placed)
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if message["role"] == "user" and not inserted:
                parts = [{"type": "image"} for _ in range(num_images)] + parts
                inserted = True
            message = {**message, "content": parts}
        out.append(message)
    if not inserted:
        raise DatasetError("the row has images but its prompt has no user message to show them in")
    return out


def with_images(prompt: list[dict], images: list) -> list[dict]:
    """The conversation with its image placeholders filled in, in order (for the processor)."""
    remaining = iter(images)
    return [{**m, "content": [{**p, "image": next(remaining)} if p.get("type") == "image" else p
                              for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in prompt]


def model_prompt(row: dict) -> str | list[dict]:
    """What generation is given for a prompt row: the images filled into the prompt if it has any."""
    return with_images(row["prompt"], row["images"]) if row.get("images") else row["prompt"]


def has_images(prompt: Any) -> bool:
    return isinstance(prompt, list) and any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"])
        for m in prompt)


# --- the processor -------------------------------------------------------------------------------


def attach_processor(tokenizer, processor) -> None:
    """Let prompts encoded with this tokenizer use `processor` for their images."""
    setattr(tokenizer, _PROCESSOR, processor)


def processor_of(tokenizer):
    return getattr(tokenizer, _PROCESSOR, None)


def is_vision_config(config) -> bool:
    """Whether a model's config is an image-text model's (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str, trust_remote_code: bool = False):
    """The model's processor, or None when the model has none (an image-text checkpoint saved
    without it: text prompts still work, image prompts are refused). Qwen-VL processors also
    hold a video processor, which needs torchvision; images alone do not, so without it the
    processor is built for images only."""
    import json

    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(processor, "image_processor"):
            return processor
    except (OSError, ValueError, AttributeError, ImportError, TypeError):  # e.g. no video processor
        pass
    config_file = Path(path) / "processor_config.json"
    if not config_file.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "processor_config.json")  # AutoProcessor fetched it
        if not isinstance(cached, str):
            return None
        config_file = Path(cached)
    class_name = json.loads(config_file.read_text())["processor_class"]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return image_only(getattr(transformers, class_name))(
        image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
        chat_template=tokenizer.chat_template)


def image_only(processor_class):
    """`processor_class` without its video processor (saved under the same class name)."""
    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def image_token_ids(config) -> list[int]:
    """Token ids that stand for image (or video) features: generation must never sample them,
    since the forward pass would then look for features that are not there (TRL suppresses them too)."""
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


# --- encoding prompts with images ----------------------------------------------------------------


@dataclass
class ImageInputs:
    """One prompt's processed images: the fields of its images (pixel_values, image_grid_thw,
    ...; concatenated over images along the first dimension, as the model takes them for a batch)
    and its per-token fields (token_type_ids, ...; one value per prompt token)."""

    image_fields: dict[str, torch.Tensor]
    token_fields: dict[str, torch.Tensor]
    # The vision tower's output for these images (see encode_images), or None: then every
    # forward encodes the pixels itself.
    encoded: Any = None


def encode_image_prompts(tokenizer, prompts: list) -> tuple[list[list[int]], list[ImageInputs | None]]:
    """Token ids (image tokens expanded) and image inputs of each prompt, each prompt processed
    once. Prompts without images get None and the tokenizer's usual encoding."""
    from lowvram_grpo.prompts import chat_template_kwargs, encode_prompts

    processor = processor_of(tokenizer)
    ids, inputs = [], []
    for prompt in prompts:
        if not has_images(prompt):
            ids += encode_prompts(tokenizer, [prompt])
            inputs.append(None)
            continue
        if processor is None:
            raise DatasetError("the prompts have images but this model has no image processor (a text model, or "
                               "an image-text checkpoint saved without processor_config.json); use an "
                               "image-text model such as Qwen/Qwen2.5-VL-3B-Instruct, or drop the image column")
        text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                             **chat_template_kwargs(tokenizer))
        images = [p["image"] for m in prompt if isinstance(m["content"], list) for p in m["content"]
                  if p.get("type") == "image"]
        encoded = processor(text=[text], images=[images], return_tensors="pt")
        token_ids = encoded.pop("input_ids")[0]
        encoded.pop("attention_mask", None)
        tokens = {k: v[0] for k, v in encoded.items() if v.dim() == 2 and v.size(0) == 1
                  and v.size(1) == token_ids.size(0) and k != "pixel_values"}
        fields = {k: v for k, v in encoded.items() if k not in tokens and isinstance(v, torch.Tensor)}
        ids.append(token_ids.tolist())
        inputs.append(ImageInputs(image_fields=fields, token_fields=tokens))
    return ids, inputs


def encode_images(model, inputs: list[ImageInputs | None]) -> None:
    """Run the vision tower once for each prompt's images and keep the features on its
    ImageInputs, when the model takes pre-encoded images (transformers' `mm_encoder_outputs`)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "mm_encoder_outputs" not in inspect.signature(causal_lm.forward).parameters:
        return
    encoder = causal_lm.get_image_features
    accepted = inspect.signature(encoder).parameters
    device = next(causal_lm.parameters()).device
    with torch.no_grad():
        for item in {id(x): x for x in inputs if x is not None}.values():
            if item.encoded is None:
                fields = {k: v.to(device) for k, v in item.image_fields.items() if k in accepted}
                item.encoded = encoder(**fields, return_dict=True)


def _joined_encodings(outputs: list) -> Any:
    """Several prompts' vision-tower outputs as one, as if their images had been encoded together:
    the per-image features (a tuple of per-image tensors, or one tensor over images) and
    Qwen3-VL's deepstack features (per layer, over image tokens) concatenated in row order."""
    def join(values: list) -> Any:
        first = values[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(values)
        if isinstance(first, tuple):
            return tuple(part for value in values for part in value)
        return [join([value[layer] for value in values]) for layer in range(len(first))]  # per layer

    fields = {key: join([getattr(o, key) for o in outputs])
              for key in ("pooler_output", "deepstack_features") if getattr(outputs[0], key, None) is not None}
    return type(outputs[0])(**fields)


def prompt_lengths(tokenizer, prompts: list) -> list[int]:
    """Token counts of prompts as the model sees them, each image's tokens included."""
    from lowvram_grpo import prompts as text_prompts

    if not any(has_images(p) for p in prompts):
        return text_prompts.prompt_lengths(tokenizer, prompts)
    return [len(ids) for ids in encode_image_prompts(tokenizer, prompts)[0]]


def forward_inputs(rows: list[ImageInputs | None] | None, prompt_lengths: list[int], prompt_width: int,
                   completion_width: int = 0) -> dict[str, torch.Tensor]:
    """The extra forward inputs of a batch of sequences: each image field concatenated over the
    rows (pre-encoded features instead of the pixels, where encode_images has run), each
    per-token field placed like the ids (prompt right-aligned in `prompt_width` columns, zeros
    on the left and over `completion_width` completion columns). `prompt_lengths` are the
    rows' real prompt lengths. Empty without images."""
    if not rows or all(r is None for r in rows):
        return {}
    present = [r for r in rows if r is not None]
    out = {key: torch.cat([r.image_fields[key] for r in present]) for key in present[0].image_fields}
    if all(r.encoded is not None for r in present):
        # Grid sizes stay (Qwen's rotary positions need them); the pixels are already encoded.
        out = {k: v for k, v in out.items() if not k.startswith("pixel_values")}
        out["mm_encoder_outputs"] = {"image": _joined_encodings([r.encoded for r in present])}
    for key, first in present[0].token_fields.items():
        field = torch.zeros((len(rows), prompt_width + completion_width), dtype=first.dtype)
        for i, (row, length) in enumerate(zip(rows, prompt_lengths)):
            if row is not None and length:
                field[i, prompt_width - length:prompt_width] = row.token_fields[key][-length:]
        out[key] = field
    return out


# --- LoRA on the language model only -------------------------------------------------------------


def language_model_targets(model, target_modules: str | list[str]) -> str:
    """peft's target_modules as a regex that matches only the language model's linear layers
    (`all-linear`) or the named ones (a list): the vision tower and projector stay frozen. A
    regex of the user's own is theirs to aim."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return target_modules
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    if target_modules == "all-linear":
        from lowvram_grpo.quantization import import_bitsandbytes

        bnb = import_bitsandbytes()
        linear = (torch.nn.Linear, bnb.nn.Linear4bit)
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, linear)})
    else:
        leaves = list(target_modules)
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})"


def vision_module_names(path: str, trust_remote_code: bool = False) -> list[str]:
    """The names of the parts of an image-text model that see images (vision tower, projector),
    from its config alone (an empty model on the meta device): kept out of 4-bit quantisation."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(
            AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), trust_remote_code=trust_remote_code)
    decoder = model.get_decoder()
    prefix = model.base_model_prefix
    # Full names from the top (model.visual, model.vision_tower, ...): transformers matches them
    # from the start of each module's name.
    return [f"{prefix}.{name}" for name, module in getattr(model, prefix).named_children() if module is not decoder]
