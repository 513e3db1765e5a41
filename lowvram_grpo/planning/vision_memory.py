"""What images add to a GRPO step's memory: the vision tower's weights and the image encoding.

memory.estimate_memory models the language model; for an image-text model (a config with a
vision_config) it adds these terms:

- static: the vision tower and projector, kept in 16 bits (model.py skips them when it
  quantises: they are small next to the language model, and every image token passes through
  them); the note says what 4 bits would save, so the choice is visible;
- generation: one vision-tower layer's activations for one prompt's image, without gradients.
  The tower runs once per prompt, before its group is generated, and every later forward of
  the step reuses its features (vision.encode_images); frozen, it leaves autograd nothing.

The vision tokens of an image come from the processor's settings for the planned image size
(`image_size`, the longest side; a square image is assumed): Qwen2-VL, Qwen2.5-VL and Qwen3-VL
cut it into patch_size pixel patches and merge spatial_merge_size^2 of them into one token;
Gemma 3 resizes every image to its tower's size and pools it to mm_tokens_per_image tokens.
Those tokens are part of the prompt, so max_prompt_length must hold them (the data's length
filter counts them); the notes say how many there are.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

# The image size planned for when the config sets none: a common resize for visual-reasoning
# data (Qwen-VL's processors would otherwise keep much larger images at full size).
DEFAULT_IMAGE_SIZE = 448
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class VisionShape:
    """What the estimate needs about the image side of an image-text model."""

    tower_params: int  # vision tower + projector
    hidden_size: int  # of the vision tower
    intermediate_size: int
    patches: int  # positions the tower sees per image
    tokens: int  # image tokens per image in the language model's prompt
    image_size: int  # the side planned for


def vision_shape(model_config: dict[str, Any], image_size: int | None) -> VisionShape | None:
    """The image side of `model_config` (a full config.json dict), or None for a text model."""
    vision = model_config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    from lowvram_grpo.planning.model_shape import PlannerError

    model_type = model_config.get("model_type", "")
    hidden = int(vision.get("hidden_size") or vision.get("embed_dim"))
    intermediate = int(vision.get("intermediate_size") or 4 * hidden)
    if model_type in QWEN_VL_TYPES:
        side = image_size or DEFAULT_IMAGE_SIZE
        patch, merge = int(vision.get("patch_size", 14)), int(vision.get("spatial_merge_size", 2))
        # The processor rounds each side to a multiple of patch * merge (at least one).
        unit = patch * merge
        cells = max(round(side / unit), 1)
        patches, tokens = (cells * merge) ** 2, cells ** 2
    elif model_type == "gemma3":
        side = int(vision["image_size"])  # Gemma 3 resizes every image to its tower's size
        patches = (side // int(vision["patch_size"])) ** 2
        tokens = int(model_config.get("mm_tokens_per_image", 256))
    else:
        raise PlannerError(f"model_config: the planner cannot model the images of {model_type} yet "
                           f"(it models {', '.join(QWEN_VL_TYPES)} and gemma3)")
    return VisionShape(tower_params=_tower_parameters(model_config), hidden_size=hidden,
                       intermediate_size=intermediate, patches=patches, tokens=tokens, image_size=side)


def _tower_parameters(model_config: dict[str, Any]) -> int:
    """Parameters of everything but the language model, counted on an empty (meta) model built
    from the config: exact for any architecture transformers knows, and no weights needed."""
    return _count_tower_parameters(json.dumps(model_config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _count_tower_parameters(config_json: str) -> int:
    """(Cached: plan() estimates many chunk sizes for one model.)"""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_config = json.loads(config_json)
    config = AutoConfig.for_model(**{k: v for k, v in model_config.items() if k != "model_type"},
                                  model_type=model_config["model_type"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    decoder = model.get_decoder()
    language = {id(p) for p in decoder.parameters()} | {id(p) for p in model.get_output_embeddings().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in language)


def vision_terms(shape: VisionShape, train_config, dtype_bytes: int, nf4_bytes_per_param: float
                 ) -> tuple[dict[str, int], dict[str, dict[str, int]], list[str]]:
    """(static parts, parts per phase, notes) that images add; `nf4_bytes_per_param` prices the
    4-bit alternative the notes compare with."""
    from lowvram_grpo.planning.chunking import GENERATION
    from lowvram_grpo.planning.model_shape import billions

    static = {f"{dtype_bytes * 8}-bit vision tower + projector ({billions(shape.tower_params)} params, frozen)":
              shape.tower_params * dtype_bytes}
    # One tower layer at its widest without autograd: the residual stream, its normed copy and
    # the MLP's input and output (as memory._nograd_layer_bytes_per_token, for the tower).
    per_patch = dtype_bytes * (3 * shape.hidden_size + 3 * shape.intermediate_size)
    phases = {GENERATION: {f"vision tower, one layer (one prompt's image, {shape.patches} patches)":
                           shape.patches * per_patch}}
    saved = shape.tower_params * (dtype_bytes - nf4_bytes_per_param) / 2**30
    notes = [f"images: {shape.tokens} vision tokens per {shape.image_size}x{shape.image_size} image, part of "
             f"max_prompt_length={train_config.max_prompt_length} (one image per prompt assumed; set image_size "
             "to plan for another size)",
             f"the vision tower stays {dtype_bytes * 8}-bit: 4-bit would save only {saved:.2f} GB and blur what "
             "every image token carries"]
    if shape.tokens >= train_config.max_prompt_length:
        notes.append(f"max_prompt_length={train_config.max_prompt_length} cannot hold one image's {shape.tokens} "
                     "tokens: raise it, or lower image_size")
    return static, phases, notes
