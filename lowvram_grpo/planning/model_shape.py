"""A model's shape, from its config alone: layers, widths, parameter counts, LoRA parameters.

No weights are loaded. `resolve_model_config(name_or_path)` turns a shipped architecture name
(`qwen2.5-7b`), a hub id that maps to one (`Qwen/Qwen2.5-7B-Instruct`), a local directory
with `config.json`, or `builtin:tiny` into the config dict that `ModelShape.from_config` reads;
memory.py estimates a run's memory from that shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram_grpo.config import TrainConfig
from lowvram_grpo.errors import UserError

ARCH_DIR = Path(__file__).resolve().parents[1] / "arch"  # lowvram_grpo/arch/


class PlannerError(UserError, ValueError):
    """The planner cannot describe this model (unknown name, unsupported architecture)."""


# --- the model's shape -------------------------------------------------------------------------


# Architectures whose layers the planner cannot describe, and why: `plan` refuses them rather
# than print a number for a model it does not understand.
UNMODELLED = {
    "qwen3_5": "linear-attention layers (gated delta net)", "qwen3_5_text": "linear-attention layers (gated delta net)",
    "qwen3_5_moe": "linear-attention layers and experts", "qwen3_next": "linear-attention layers and experts",
    "granitemoehybrid": "Mamba-2 layers and experts", "falcon_h1": "Mamba-2 layers", "jamba": "Mamba layers",
    "bamba": "Mamba-2 layers", "nemotron_h": "Mamba-2 layers",
    "gpt_oss": "its experts and attention sinks", "gemma4": "per-layer embeddings and shared KV layers",
    "gemma4_text": "per-layer embeddings and shared KV layers", "gemma3n": "per-layer embeddings and AltUp",
}
# The mixture-of-experts layout the planner models: Qwen3-MoE's (every layer sparse, experts
# stored as one 3-D tensor per projection, a linear router).
MOE_TYPES = ("qwen3_moe",)
# Per-head RMSNorm on queries and keys (head_dim weights each, per attention layer).
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3_text", "lfm2", "qwen3_vl_text")
# Qwen2 hard-codes a bias on q, k and v (its config has no key for it), and so do the language
# models of Qwen2-VL and Qwen2.5-VL.
QKV_BIAS_TYPES = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")
# Gemma 2/3 normalise before and after both attention and MLP: four norms per layer.
SANDWICH_NORM_TYPES = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about an architecture: a decoder-only LM whose layers are
    attention (full or sliding-window) or short convolutions (LFM2), with a dense or a
    mixture-of-experts MLP."""

    hidden_size: int
    intermediate_size: int  # of the dense MLP (LFM2: after its automatic adjustment)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = ""
    # One entry per layer: "full" or "sliding" attention, or "conv" (a short convolution whose
    # generation state is a few tokens per sequence, not a KV cache growing with length).
    layer_kinds: tuple[str, ...] = ()
    sliding_window: int | None = None
    conv_kernel: int = 0
    num_experts: int = 0  # 0 = dense MLP
    experts_per_token: int = 0
    expert_intermediate_size: int = 0

    @classmethod
    def from_config(cls, model_config: Any) -> ModelShape:
        """From a config dict (config.json) or a transformers PretrainedConfig."""
        cfg = _config_dict(model_config)
        model_type = str(cfg.get("model_type", ""))
        if model_type in UNMODELLED:
            raise PlannerError(
                f"model_config: the planner cannot model {model_type} ({UNMODELLED[model_type]}) yet, so it "
                "gives no estimate rather than a wrong one; training works (see the README's support table): "
                "set the chunk sizes by hand and watch peak_memory_gb")
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if (cfg.get(key) or 0) > 1 and model_type not in MOE_TYPES:
                raise PlannerError(
                    f"model_config: the planner cannot model the experts of {model_type or 'this model'} "
                    f"({key}={cfg[key]}) yet; it models Qwen3-MoE's layout ({', '.join(MOE_TYPES)})")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if cfg.get(k) is None]
        if missing:
            raise PlannerError(f"model_config: missing {', '.join(missing)}; is this a decoder-only LM config?")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        attention_bias = bool(cfg.get("attention_bias", False))
        # Qwen3-MoE's config.json says num_experts; transformers 5 saves it as num_local_experts.
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        moe = model_type in MOE_TYPES and experts > 1
        if moe and (cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1):
            raise PlannerError("model_config: the planner models mixture-of-experts models whose every layer is "
                               "sparse (mlp_only_layers=[], decoder_sparse_step=1)")
        return cls(
            hidden_size=hidden,
            intermediate_size=_dense_intermediate_size(cfg, hidden),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            # A config.json without the key gets its model class's default (untied for Llama
            # and Qwen2, tied for others); assuming untied can only over-estimate.
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Llama-style configs switch all four attention projections with `attention_bias`.
            qkv_bias=model_type in QKV_BIAS_TYPES or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            model_type=model_type,
            layer_kinds=_layer_kinds(cfg, layers),
            sliding_window=cfg.get("sliding_window"),
            conv_kernel=int(cfg.get("conv_L_cache") or 0),
            num_experts=experts if moe else 0,
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if moe else 0,
            expert_intermediate_size=int(cfg.get("moe_intermediate_size") or 0) if moe else 0,
        )

    @property
    def active_intermediate_size(self) -> int:
        """MLP width a token goes through: the dense MLP's, or its experts' together."""
        if self.num_experts:
            return self.experts_per_token * self.expert_intermediate_size
        return self.intermediate_size

    def linear_shapes(self, kind: str = "full") -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each nn.Linear in one decoder layer of `kind`, by its
        Llama/Qwen2/Mistral name, so `lora_target_modules: [q_proj, v_proj]` counts exactly.
        A MoE layer's only MLP linear is its router (`gate`): the experts are 3-D tensors."""
        H, I, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        if kind == "conv":  # LFM2: in_proj to B, C and x gates, a depthwise conv, out_proj
            mixer = {"in_proj": (H, 3 * H), "out_proj": (H, H)}
        elif self.model_type == "phi3":  # one fused q/k/v projection, one fused gate/up
            return {"qkv_proj": (H, q + 2 * kv), "o_proj": (q, H), "gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
        else:
            mixer = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H)}
        if self.num_experts:
            return {**mixer, "gate": (H, self.num_experts)}
        return {**mixer, "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}

    def all_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every linear name of any layer kind, with its shape (for LoRA target matching)."""
        shapes: dict[str, tuple[int, int]] = {}
        for kind in dict.fromkeys(self.layer_kinds):
            shapes.update(self.linear_shapes(kind))
        return shapes

    def expert_parameters(self) -> int:
        """Parameters of all experts: gate, up and down per expert, in every layer."""
        return self.num_layers * self.num_experts * 3 * self.hidden_size * self.expert_intermediate_size


def _dense_intermediate_size(cfg: dict[str, Any], hidden: int) -> int:
    size = int(cfg.get("intermediate_size") or 4 * hidden)
    if cfg.get("model_type") == "lfm2" and cfg.get("block_auto_adjust_ff_dim"):
        # LFM2's MLP is 2/3 of the configured width, scaled and rounded up (Lfm2MLP).
        size = int(2 * size / 3)
        size = int(float(cfg.get("block_ffn_dim_multiplier") or 1.0) * size)
        multiple = int(cfg.get("block_multiple_of") or 1)
        size = multiple * ((size + multiple - 1) // multiple)
    return size


def _layer_kinds(cfg: dict[str, Any], layers: int) -> tuple[str, ...]:
    """"full", "sliding" or "conv" per layer, from `layer_types` or the older pattern keys."""
    types = cfg.get("layer_types")
    if types is None and cfg.get("model_type") == "lfm2" and cfg.get("full_attn_idxs") is not None:
        full = set(cfg["full_attn_idxs"])
        types = ["full_attention" if i in full else "conv" for i in range(layers)]
    if types is None and cfg.get("sliding_window_pattern") and cfg.get("sliding_window"):
        # Gemma 3: every `pattern`-th layer is global, the others slide.
        pattern = int(cfg["sliding_window_pattern"])
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    if types is None and cfg.get("model_type") == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if types is None:
        # Mistral-style configs slide on every layer when they set a window (and use it).
        slides = cfg.get("sliding_window") and cfg.get("use_sliding_window", True)
        types = ["sliding_attention" if slides else "full_attention"] * layers
    kinds = {"full_attention": "full", "sliding_attention": "sliding", "conv": "conv"}
    unknown = sorted({t for t in types if t not in kinds})
    if unknown:
        raise PlannerError(f"model_config: the planner cannot model layers of type {', '.join(unknown)} yet")
    return tuple(kinds[t] for t in types[:layers])


def _config_dict(model_config: Any) -> dict[str, Any]:
    if hasattr(model_config, "get_text_config"):  # a transformers PretrainedConfig
        model_config = model_config.get_text_config().to_dict()
    if not isinstance(model_config, dict):
        raise PlannerError(f"model_config: expected a dict or a transformers config, got {type(model_config).__name__}")
    # Multimodal configs keep the language model's shape under text_config.
    if "hidden_size" not in model_config and isinstance(model_config.get("text_config"), dict):
        return model_config["text_config"]
    return model_config


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts by where they live in memory."""

    linear: int  # decoder-layer nn.Linear weights: quantised to NF4
    embedding: int  # input embeddings (V x H), kept in 16-bit
    lm_head: int  # 0 when tied to the embeddings
    other: int  # norms, biases, convolutions: kept in 16-bit
    experts: int = 0  # MoE expert tensors: 3-D parameters, which bitsandbytes leaves in 16-bit

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.other + self.experts


def count_parameters(model_config: Any) -> ParamCounts:
    """Parameters of the model, computed from its config (no weights needed)."""
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    H, I = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    linear = other = 0
    for kind in shape.layer_kinds:
        linear += sum(i * o for i, o in shape.linear_shapes(kind).values())
        norms = 4 * H if shape.model_type in SANDWICH_NORM_TYPES else 2 * H
        if kind == "conv":
            other += norms + H * shape.conv_kernel  # the depthwise convolution's weights
            continue
        biases = (q + 2 * kv if shape.qkv_bias else 0) + (H if shape.o_bias else 0)
        if shape.model_type in QK_NORM_TYPES:
            norms += 2 * shape.head_dim
        elif shape.model_type == "olmo3":  # OLMo normalises the whole query and key projections
            norms += q + kv
        other += biases + norms
    if shape.mlp_bias and not shape.num_experts:
        other += shape.num_layers * (2 * I + H)
    embedding = shape.vocab_size * H
    return ParamCounts(linear=linear, embedding=embedding, lm_head=0 if shape.tied_embeddings else embedding,
                       other=other + H, experts=shape.expert_parameters())  # + the final norm


def lora_parameters(model_config: Any, train_config: TrainConfig) -> tuple[int, list[str]]:
    """(LoRA parameters, notes) for `lora_r` on `lora_target_modules`. Each adapted linear
    (in -> out) gains A (r x in) and B (out x r)."""
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    targets, notes = lora_targets(train_config.lora_target_modules, shape.all_linear_shapes())
    r = train_config.lora_r
    total = 0
    for kind in shape.layer_kinds:
        shapes = shape.linear_shapes(kind)
        total += sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    if shape.num_experts:
        notes.append("mixture of experts: the experts stay 16-bit (bitsandbytes quantises nn.Linear layers only)")
        if "all-linear" in ([train_config.lora_target_modules] if isinstance(train_config.lora_target_modules, str)
                            else train_config.lora_target_modules):
            # peft's all-linear also adapts the 3-D expert tensors, one LoRA per expert, with
            # twice the rank on the fused gate/up projection (peft's rank_pattern for it).
            H, I, E = shape.hidden_size, shape.expert_intermediate_size, shape.num_experts
            total += shape.num_layers * E * (2 * r * (H + 2 * I) + r * (I + H))
    return total, notes


def lora_targets(spec: str | list[str], shapes: dict[str, tuple[int, int]]) -> tuple[list[str], list[str]]:
    if isinstance(spec, str):
        spec = [spec]
    if "all-linear" in spec:
        return list(shapes), []  # peft's all-linear: every linear layer except the LM head
    # peft's rule for a list of names: a module matches a name it equals or ends with ".<name>".
    targets = [name for name in shapes if any(s == name or s.endswith("." + name) for s in spec)]
    if not targets:
        return list(shapes), [f"lora_target_modules {spec} match no known layer name; counted as all-linear"]
    return targets, []



def billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


# --- resolving a model name to its config -------------------------------------------------------


def shipped_architectures() -> list[str]:
    """Names of the architecture configs shipped in lowvram_grpo/arch/ (e.g. qwen2.5-7b)."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def load_arch(name: str) -> dict[str, Any]:
    """A shipped architecture's config.json as a dict (keys starting with '_' removed)."""
    path = ARCH_DIR / f"{name.lower()}.json"
    if not path.is_file():
        raise PlannerError(f"no shipped architecture '{name}'; available: {', '.join(shipped_architectures())}")
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def arch_for_model_name(name: str) -> str | None:
    """The shipped architecture a hub id names, by lowercase substring, longest name first:
    `Qwen/Qwen2.5-7B-Instruct` -> `qwen2.5-7b`, `meta-llama/Llama-3.1-8B` -> `llama-3.1-8b`."""
    lowered = name.lower()
    for arch in sorted(shipped_architectures(), key=len, reverse=True):
        if arch in lowered:
            return arch
    return None


def _cached_hub_config(repo_id: str) -> dict[str, Any] | None:
    """The checkpoint's own config.json from the local Hugging Face cache, if it is there.
    A file lookup (no transformers import, no network), so the app's preset form stays quick."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    if not isinstance(path, str):  # None (not cached) or the "known missing" marker
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def resolve_model_config(name_or_path: str) -> dict[str, Any]:
    """The config dict of a model, without loading weights.

    Tried in order: `builtin:tiny` (built locally if needed), a local directory with
    config.json (or the config.json itself), the model's own config.json in the local Hugging
    Face cache (the real thing, when it has been downloaded), a shipped architecture name
    (`qwen2.5-7b`) or a hub id containing one (`Qwen/Qwen2.5-7B-Instruct`), and finally the hub.
    Offline with none of these, the error says so.
    """
    from lowvram_grpo.model import BUILTIN_PREFIX, resolve_model_path

    if name_or_path.startswith(BUILTIN_PREFIX):
        name_or_path = resolve_model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.is_dir():
        raise PlannerError(f"model_name_or_path: {path} has no config.json")
    if name_or_path.lower() in shipped_architectures():
        return load_arch(name_or_path.lower())
    cached = _cached_hub_config(name_or_path)
    if cached is not None:
        return cached
    arch = arch_for_model_name(name_or_path)
    if arch:
        return load_arch(arch)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path).to_dict()  # an image-text model's vision_config too
    except Exception as err:  # offline, unknown id, gated repo...
        raise PlannerError(
            f"model_name_or_path: no config for '{name_or_path}': it is not in the local Hugging Face cache "
            f"and the hub did not answer ({type(err).__name__}; offline?). Download it once "
            f"(`hf download {name_or_path} config.json`), give a local directory with config.json, or use "
            f"one of the shipped architectures: {', '.join(shipped_architectures())}") from None
