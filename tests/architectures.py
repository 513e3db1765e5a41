"""Tiny random models of the architectures people fine-tune, for the compatibility matrix.

No weights can be downloaded, so the matrix tests architectures, not checkpoints: each entry
starts from transformers' own config class for the architecture (whose defaults mirror the
checkpoint named in `source`) and scales it down to a few layers and small widths. What makes
the architecture itself is kept or set to the real model's value: the layer pattern (sliding /
full attention, linear attention, convolution or Mamba layers, at least one of each), mixture
of experts, tied embeddings, logit soft-capping and scaling, partial rotary embeddings. Sliding
windows shrink to 4 tokens, so that the test sequences are longer than the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 64  # the tiny character tokenizer has 19 tokens; the rest are never produced
WINDOW = 4  # sliding window, shorter than the test sequences so it matters

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256)


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers' config class, by its model_type
    source: str  # the checkpoint the config class's defaults (and our values) mirror
    features: str  # what is special about it, for the support table
    overrides: dict = field(default_factory=dict)  # on top of SMALL
    lora_target_modules: str = "all-linear"
    # An image-text model built with its processor by lowvram_grpo.builtin.tiny_vlm (that module's
    # architecture name); tests/test_vision.py checks it with images, the matrix with text.
    image_text: str | None = None


SLIDING_THEN_FULL = ["sliding_attention"] * 3 + ["full_attention"]
# peft's regex form of lora_target_modules, as the Gemma 3 4B preset uses it.
LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

ARCHITECTURES: dict[str, Arch] = {
    "qwen2": Arch("qwen2", "Qwen/Qwen2.5-7B-Instruct", "dense, q/k/v bias"),
    "qwen3": Arch("qwen3", "Qwen/Qwen3-8B", "dense, q/k norms"),
    "qwen3_moe": Arch("qwen3_moe", "Qwen/Qwen3-30B-A3B", "mixture of experts (128 x top-8)",
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "qwen3_5": Arch("qwen3_5_text", "Qwen/Qwen3.5-27B",
                    "hybrid: 3 of 4 layers linear attention (gated delta net, recurrent state)",
                    dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                         linear_value_head_dim=16, layer_types=["linear_attention"] * 3 + ["full_attention"])),
    "llama": Arch("llama", "meta-llama/Llama-3.2-3B-Instruct", "dense, tied embeddings",
                  dict(tie_word_embeddings=True)),
    "mistral": Arch("mistral", "mistralai/Mistral-7B-Instruct-v0.3", "dense"),
    "gemma2": Arch("gemma2", "google/gemma-2-2b-it", "sliding/full alternating, logit soft-capping (30)",
                   dict(sliding_window=WINDOW, query_pre_attn_scalar=16, final_logit_softcapping=30.0)),
    "gemma3": Arch("gemma3_text", "google/gemma-3-1b-it", "5 sliding : 1 full attention, 262k vocabulary",
                   dict(sliding_window=WINDOW, query_pre_attn_scalar=16, layer_types=SLIDING_THEN_FULL)),
    "gemma3-multimodal": Arch(
        "gemma3_text", "google/gemma-3-4b-it",
        "the 4B checkpoint: Gemma3ForConditionalGeneration, SigLIP tower, 4 pooled tokens per image; images: tests/test_vision.py",
        lora_target_modules=LANGUAGE_MODEL_LINEARS, image_text="gemma3"),
    "qwen2_5_vl": Arch("qwen2_5_vl_text", "Qwen/Qwen2.5-VL-3B-Instruct",
                       "image-text: windowed ViT, 2x2 patch merger, M-RoPE; images: tests/test_vision.py",
                       image_text="qwen2_5_vl"),
    "qwen3_vl": Arch("qwen3_vl_text", "Qwen/Qwen3-VL-8B-Instruct",
                     "image-text: deepstack ViT features, interleaved M-RoPE; images: tests/test_vision.py",
                     image_text="qwen3_vl"),
    "gemma4": Arch("gemma4_text", "google/gemma-4-e2b-it",
                   "sliding/full, per-layer embeddings, logit soft-capping",
                   dict(sliding_window=WINDOW, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                        layer_types=SLIDING_THEN_FULL, final_logit_softcapping=30.0)),
    "phi3": Arch("phi3", "microsoft/Phi-4-mini-instruct", "fused qkv and gate/up, partial rotary, tied",
                 dict(partial_rotary_factor=0.75, tie_word_embeddings=True)),
    "smollm3": Arch("smollm3", "HuggingFaceTB/SmolLM3-3B", "dense, no RoPE on every 4th layer, tied",
                    dict(tie_word_embeddings=True)),
    "lfm2": Arch("lfm2", "LiquidAI/LFM2-1.2B", "hybrid: short-convolution and attention layers",
                 dict(layer_types=["conv", "full_attention", "conv", "full_attention"],
                      block_auto_adjust_ff_dim=False)),
    "olmo3": Arch("olmo3", "allenai/Olmo-3-7B-Instruct", "3 sliding : 1 full attention",
                  dict(sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL)),
    "granitemoehybrid": Arch("granitemoehybrid", "ibm-granite/granite-4.0-h-tiny",
                             "hybrid Mamba-2 / attention, mixture of experts, logit scaling",
                             dict(layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=4,
                                  mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=8,
                                  num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
                                  logits_scaling=4.0, embedding_multiplier=12.0)),
    "gpt_oss": Arch("gpt_oss", "openai/gpt-oss-20b", "mixture of experts, sliding/full, attention sinks",
                    dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention"] * 2)),
}


def build_tiny_arch(name: str, path: Path) -> Path:
    """Save a tiny random `name` model with the tiny character tokenizer to `path`."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from lowvram_grpo.builtin.tiny_model import build_tokenizer

    arch = ARCHITECTURES[name]
    if arch.image_text:
        from lowvram_grpo.builtin.tiny_vlm import build_tiny_vlm

        build_tiny_vlm(arch.image_text, path, hidden=SMALL["hidden_size"], layers=SMALL["num_hidden_layers"])
        return path
    tokenizer = build_tokenizer()
    text = dict(**{**SMALL, **arch.overrides}, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = CONFIG_MAPPING[arch.model_type](**text)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def distinct_characters(prompts, completions, **kwargs) -> list[float]:
    """A reward that differs between random completions (the toy task's exact answer would be
    0 for all of them, leaving GRPO nothing to learn from): distinct characters used."""
    from lowvram_grpo.rewards.base import completion_text

    return [float(len(set(completion_text(c)))) for c in completions]
