"""Memory estimate: how much GPU memory a GRPO run needs, from the model's config alone.

No weights are loaded: everything is computed from the architecture (`config.json`: hidden
size, layers, heads, vocabulary...) and the run's settings (`TrainConfig`), for given chunk
sizes: `estimate_memory(model_config, train_config)` -> `MemoryEstimate`, a breakdown in bytes.
Choosing chunk sizes that fit a card, and printing the result, is planner.py's job.

`resolve_model_config(name_or_path)` turns a shipped architecture name (`qwen2.5-7b`), a hub id
that maps to one (`Qwen/Qwen2.5-7B-Instruct`), a local directory with `config.json`, or
`builtin:tiny` into the config dict the estimate needs.

How memory is modelled
----------------------
A GRPO step has phases that do not overlap in time, so the peak is

    static (weights, LoRA, optimizer states, CUDA context) + max(phases)

- generation: the KV cache of one chunk of `generation_chunk_size` sequences, the prefill's
  activations (one layer at a time, no gradients) and the sampling logits.
- log-probs (reference and old-policy): a no-grad forward of one micro-batch.
- update, in two phases because backward runs the LM head first and the layers after it:
  "LM head": the checkpointed input of every decoder layer, the final hidden states and one
  LM-head chunk in fp32 (`logprob_chunk_size` x vocab); "layers": the checkpointed inputs and
  one decoder layer recomputed in backward (plus the gradients flowing through it). Both hold
  the LoRA gradients, which accumulate over micro-batches.

The numbers are estimates (aim: within ~15% of `torch.cuda.max_memory_allocated` plus the CUDA
context), assuming transformers' default SDPA attention (no T x T score matrix is stored) and
the trainer in this package (adapter-off reference, chunked LM head, fp32 LoRA weights).
Allocator fragmentation is what the planner's safety margin is for.

Units: "GB" here means GiB (2**30 bytes), as in the trainer's `peak_memory_gb` and as GPU
makers' "16 GB" cards actually hold 16 GiB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram_grpo.planning.chunking import GENERATION, LOGPROBS, UPDATE
from lowvram_grpo.config import TrainConfig

GIB = 2**30
ARCH_DIR = Path(__file__).resolve().parents[1] / "arch"  # lowvram_grpo/arch/

# --- constants, each with its reason -----------------------------------------------------------

# NF4 stores 4 bits per weight. bitsandbytes quantises blocks of 64 weights, each with an
# absmax scale. Without double quantisation that scale is fp32: 32/64 = 0.5 bit per weight.
# With double quantisation (`bnb_4bit_use_double_quant=True`, what model.py loads) the scales
# are stored in 8 bits (8/64 = 0.125 bit) plus one fp32 scale per 256 of those
# (32/(64*256) ~= 0.002 bit): ~0.127 bit per weight, so ~0.516 byte per weight in all.
NF4_BITS = 4.0
NF4_ABSMAX_BITS_DOUBLE_QUANT = 8 / 64 + 32 / (64 * 256)
NF4_BYTES_PER_PARAM = (NF4_BITS + NF4_ABSMAX_BITS_DOUBLE_QUANT) / 8

# bitsandbytes dequantises a whole 4-bit weight to the compute dtype for each matmul that needs
# gradients; without gradients, 0.50's gemm_4bit op avoids it on the CPU (bench/planner_check.py
# measures this) and may on a GPU. Counted in every phase to stay on the safe side.
DEQUANT_TERM = "dequantised weight of the largest linear"

# bitsandbytes' 8-bit optimizers keep each state in 1 byte plus one fp32 absmax per block of
# 256 values: 2 states -> 2 * (1 + 4/256) bytes per parameter.
ADAM8BIT_BYTES_PER_PARAM = 2 * (1 + 4 / 256)

# The CUDA context (kernels, cuBLAS/cuDNN workspaces) lives outside torch's allocator: 300-600
# MiB depending on GPU and driver, invisible to torch.cuda.max_memory_allocated but not to the
# card. 0.5 GiB is a round, slightly conservative figure.
CUDA_OVERHEAD_BYTES = GIB // 2

# The LM-head chunk (rows x vocab) exists as the logits in the compute dtype plus fp32 tensors
# of the same shape: with gradients ~4 at the peak (fp32 upcast, log_softmax, the entropy
# metric's exp, then the gradients of log_softmax and of the temperature division); without
# gradients 3 (upcast, divided by the temperature, log_softmax). Measured: 15.4 and 11.1 bytes
# per element (bf16 logits), against the 18 and 12 counted here.
LOGPROB_FP32_COPIES = 4
LOGPROB_FP32_COPIES_NO_GRAD = 3

# Sampling in generate(): the last position's logits in fp32, processed, and the softmax.
SAMPLING_FP32_COPIES = 3

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class PlannerError(ValueError):
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
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3_text", "lfm2")
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
    def from_config(cls, model_config: Any) -> "ModelShape":
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
            # Qwen2 hard-codes a bias on q, k and v (its config has no key for it); Llama-style
            # configs switch all four attention projections with `attention_bias`.
            qkv_bias=model_type == "qwen2" or attention_bias,
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
    targets, notes = _lora_targets(train_config.lora_target_modules, shape.all_linear_shapes())
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


def _lora_targets(spec: str | list[str], shapes: dict[str, tuple[int, int]]) -> tuple[list[str], list[str]]:
    if isinstance(spec, str):
        spec = [spec]
    if "all-linear" in spec:
        return list(shapes), []  # peft's all-linear: every linear layer except the LM head
    # peft's rule for a list of names: a module matches a name it equals or ends with ".<name>".
    targets = [name for name in shapes if any(s == name or s.endswith("." + name) for s in spec)]
    if not targets:
        return list(shapes), [f"lora_target_modules {spec} match no known layer name; counted as all-linear"]
    return targets, []


# --- the estimate -------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Peak GPU memory of a run, broken down in bytes.

    `parts` holds the static parts and the parts of the peak phase; they sum to `total_bytes`.
    `phases` holds every phase's transient parts (the peak one included), for display.
    """

    parts: dict[str, int]
    phases: dict[str, dict[str, int]]
    peak_phase: str
    static_bytes: int
    total_bytes: int
    weights_bytes: int  # the base model's weights as loaded: 4-bit linears + 16-bit rest
    optimizer_bytes: int
    params: ParamCounts
    lora_params: int
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    @property
    def allocated_bytes(self) -> int:
        """The total without the CUDA context: what torch's allocator holds at the peak, i.e. what
        torch.cuda.max_memory_allocated measures and set_per_process_memory_fraction caps."""
        return self.total_bytes - CUDA_OVERHEAD_BYTES

    def phase_bytes(self, phase: str) -> int:
        return sum(self.phases[phase].values())


def _dtype_bytes(train_config: TrainConfig) -> int:
    # "auto" is bf16 or fp16 on a GPU: 2 bytes either way. The planner is about GPU memory.
    return DTYPE_BYTES.get(train_config.dtype, 2)


def estimate_memory(model_config: Any, train_config: TrainConfig, *,
                    generation_chunk_size: int | None = None, micro_batch_size: int | None = None,
                    logprob_chunk_size: int | None = None) -> MemoryEstimate:
    """Estimate the peak GPU memory of training `model_config` as `train_config` says.

    `model_config` is a config dict (config.json) or a transformers PretrainedConfig. The three
    chunk sizes default to the train config's; plan() passes candidates instead.
    """
    shape = ModelShape.from_config(model_config)
    counts = count_parameters(shape)
    c = train_config
    gen_chunk = generation_chunk_size or c.generation_chunk_size
    micro = micro_batch_size or c.micro_batch_size
    lp_chunk = logprob_chunk_size or c.logprob_chunk_size
    db = _dtype_bytes(c)
    H, L, V = shape.hidden_size, shape.num_layers, shape.vocab_size
    kv_width = shape.num_kv_heads * shape.head_dim
    prompt, completion = c.max_prompt_length, c.max_completion_length
    seq = prompt + completion  # worst case: every completion runs to max_completion_length
    sequences = c.sequences_per_step
    gen_chunk, micro = min(gen_chunk, sequences), min(micro, sequences)
    notes: list[str] = []
    linear_shapes = shape.all_linear_shapes()

    # ---- static: lives for the whole run ----
    static: dict[str, int] = {}
    if c.quantization == "nf4":
        # transformers' bitsandbytes integration quantises the decoder layers' nn.Linear only:
        # embeddings, the LM head (tied or not), norms and biases stay in the compute dtype.
        static[f"4-bit NF4 linear weights ({billions(counts.linear)} params, ~4.13 bit each)"] = \
            round(counts.linear * NF4_BYTES_PER_PARAM)
    else:
        static[f"{db * 8}-bit linear weights ({billions(counts.linear)} params)"] = counts.linear * db
    if counts.experts:
        static[f"{db * 8}-bit MoE experts ({billions(counts.experts)} params, not quantised)"] = counts.experts * db
    head = "tied lm_head" if shape.tied_embeddings else "lm_head"
    kept = counts.embedding + counts.lm_head + counts.other
    static[f"{db * 8}-bit embeddings + {head} + norms ({billions(kept)})"] = kept * db

    weights_bytes = sum(static.values())

    lora, lora_notes = lora_parameters(shape, c)
    notes += lora_notes
    # peft keeps adapter weights in fp32 on a 16-bit/4-bit base (see model.py).
    static[f"LoRA weights, fp32 (r={c.lora_r}, {_millions(lora)} params)"] = lora * 4
    saved_modules = _modules_to_save_params(shape, c.lora_modules_to_save, notes)
    if saved_modules:
        static[f"modules_to_save copies ({_millions(saved_modules)} params)"] = saved_modules * db
    if c.optimizer == "paged_adamw_8bit":
        optimizer = round((lora + saved_modules) * ADAM8BIT_BYTES_PER_PARAM)
        static["optimizer: paged 8-bit AdamW states (~2 bytes/param)"] = optimizer
    else:
        # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype.
        optimizer = lora * 8 + saved_modules * 2 * db
        static["optimizer: AdamW states (2 x fp32 per LoRA param)"] = optimizer
    static["CUDA context + cuBLAS workspace (constant)"] = CUDA_OVERHEAD_BYTES

    # DEQUANT_TERM: the largest linear layer exists once in the compute dtype, transiently.
    largest_linear = max(i * o for i, o in linear_shapes.values())
    dequant = largest_linear * db if c.quantization == "nf4" else 0

    # ---- phase 1: generation of one chunk ----
    # K and V for every attention layer, every position, every sequence of the chunk; a
    # sliding-window layer keeps only its window (transformers' sliding cache layers drop older
    # positions); a convolution layer keeps its last few inputs instead.
    kv_bytes = 2 * kv_width * db
    full_layers, sliding_layers = shape.layer_kinds.count("full"), shape.layer_kinds.count("sliding")
    window = min(seq, shape.sliding_window or seq)
    generation = {
        f"KV cache ({gen_chunk} seq x {seq} tokens x {full_layers} layers)": gen_chunk * seq * kv_bytes * full_layers,
    }
    if sliding_layers:
        generation[f"sliding-window KV cache ({gen_chunk} seq x {window} tokens x {sliding_layers} layers)"] = \
            gen_chunk * window * kv_bytes * sliding_layers
    conv_layers = shape.layer_kinds.count("conv")
    if conv_layers:
        generation[f"convolution state ({gen_chunk} seq x {conv_layers} layers)"] = \
            gen_chunk * conv_layers * H * shape.conv_kernel * db
    generation.update({
        # The prefill runs one layer at a time without gradients: the widest moment is the MLP.
        f"prefill activations (one layer, {gen_chunk} x {prompt} tokens)":
            gen_chunk * prompt * _nograd_layer_bytes_per_token(shape, db),
        "sampling logits (fp32)": gen_chunk * V * 4 * SAMPLING_FP32_COPIES,
    })
    if dequant:
        generation[DEQUANT_TERM] = dequant

    # ---- phase 2: reference / old-policy log-probs, no gradients ----
    tokens = micro * seq
    rows = min(lp_chunk, micro * completion)  # the LM head runs on completion positions only
    reference = {
        f"forward activations (one layer, {micro} x {seq} tokens)": tokens * _nograd_layer_bytes_per_token(shape, db),
        "final hidden states": tokens * H * db,
        f"LM-head chunk ({rows} positions x {V} vocab)": rows * V * 4 * LOGPROB_FP32_COPIES_NO_GRAD,
    }
    if dequant:
        reference[DEQUANT_TERM] = dequant

    # ---- phases 3 and 4: the update of one micro-batch, with gradients ----
    # Autograd runs the LM head's chunks backward first, then the decoder layers, so the
    # LM-head chunk and the recomputed layer are never alive together: two phases.
    update_common: dict[str, int] = {}
    if c.gradient_checkpointing:
        update_common[f"checkpointed layer inputs ({micro} x {seq} tokens x {L} layers)"] = tokens * H * db * L
    # The final norm's output (and its fp32 upcast), the completion positions sliced out of it
    # for the LM head, and their gradients.
    update_common["final hidden states (+ gradients)"] = 2 * (tokens + micro * completion) * H * db + tokens * H * 4
    # Gradients accumulate over micro-batches, so they exist from the first backward on.
    update_common["LoRA gradients (fp32)"] = lora * 4 + saved_modules * db
    # Token ids and masks of the micro-batch, and per-token reference/old log-probs of the step.
    frozen_copies = (1 if c.beta > 0 else 0) + (1 if c.num_iterations > 1 else 0)
    update_common["rollout tensors (ids, masks, frozen log-probs)"] = \
        tokens * 8 * 2 + sequences * completion * 4 * (frozen_copies + 2)

    update_head = dict(update_common)
    update_head[f"LM-head chunk ({rows} positions x {V} vocab, fp32)"] = rows * V * (db + LOGPROB_FP32_COPIES * 4)

    update_layers = dict(update_common)
    layer_bytes = _train_layer_bytes_per_token(shape, db, c)
    if c.gradient_checkpointing:
        update_layers["one layer recomputed in backward (+ its gradients)"] = tokens * layer_bytes
    else:
        update_layers[f"activations of all {L} layers (no gradient checkpointing)"] = tokens * layer_bytes * L
        notes.append("gradient_checkpointing is off: every layer's activations are kept; "
                     "turn it on to save most of them")
    if dequant:
        update_layers[DEQUANT_TERM] = dequant

    phases = {GENERATION: generation, LOGPROBS: reference, f"{UPDATE}: LM head": update_head,
              f"{UPDATE}: layers": update_layers}
    # model: rewards stay loaded for the whole run and run between generation and update.
    from lowvram_grpo.rewards.reward_model import reward_model_memory

    reward_static, reward_phase = reward_model_memory(c, db)
    static.update(reward_static)
    if reward_phase:
        phases["reward model"] = reward_phase
    if c.beta == 0 and c.num_iterations == 1:
        del phases[LOGPROBS]  # no frozen log-probs are computed at all
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    parts = {**static, **{f"[{peak_phase}] {k}": v for k, v in phases[peak_phase].items()}}
    static_bytes = sum(static.values())
    return MemoryEstimate(
        parts=parts, phases=phases, peak_phase=peak_phase, static_bytes=static_bytes,
        total_bytes=sum(parts.values()), weights_bytes=weights_bytes, optimizer_bytes=optimizer,
        params=counts, lora_params=lora,
        settings={"generation_chunk_size": gen_chunk, "micro_batch_size": micro, "logprob_chunk_size": lp_chunk,
                  "seq_len": seq, "dtype_bytes": db},
        notes=notes)


def _nograd_layer_bytes_per_token(shape: ModelShape, db: int) -> int:
    """Widest moment of one decoder layer's forward without autograd: the residual stream,
    its normed copy and the MLP's gate, up and product, plus peft's fp32 copy of the
    down-projection's input (LoRA adapters run in fp32)."""
    H, I = shape.hidden_size, shape.active_intermediate_size
    return db * (3 * H + 3 * I) + 4 * I


def _train_layer_bytes_per_token(shape: ModelShape, db: int, c: TrainConfig) -> int:
    """Bytes per token of one decoder layer recomputed in backward, at its peak.

    What autograd keeps: RMSNorm upcasts its input to fp32 (kept) and outputs the compute dtype; attention keeps
    q, k, v, their rotary copies and its output (SDPA keeps no T x T matrix); the MLP keeps
    gate, up, act(gate) and their product. peft casts each adapted layer's input to fp32 for
    LoRA's A matrix and keeps that copy for the gradient of A (a second copy with dropout).

    Calibrated without a GPU: the peak of live tensor bytes (tracked op by op with a
    TorchDispatchMode) during backward through a 4-bit + LoRA Qwen2 micro-batch, minus the
    checkpointed inputs and LoRA gradients, came to 0.85-1.0x this count for four shapes
    (hidden 256-1024, 256-2048 tokens, with and without dropout). The gradients flowing back
    through the layer fit in what this count over-estimates of the saved activations.
    """
    H, I = shape.hidden_size, shape.active_intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norms = 2 * (4 * H + db * H)
    attention = db * ((q + 2 * kv) + (q + kv) + q + 2 * H)
    mlp = db * (4 * I + 2 * H)
    shapes = shape.all_linear_shapes()
    targets, _ = _lora_targets(c.lora_target_modules, shapes)
    lora_inputs = sum(shapes[t][0] for t in targets) * 4 * (2 if c.lora_dropout > 0 else 1)
    lora_rank = len(targets) * c.lora_r * 4  # A's output, kept for B's gradient
    # (B's fp32 output, its scaled and cast copies are transient: no later op keeps them.)
    return norms + attention + mlp + lora_inputs + lora_rank


def _modules_to_save_params(shape: ModelShape, modules: list[str], notes: list[str]) -> int:
    """Parameters of fully trained modules (peft's modules_to_save), e.g. lm_head."""
    total = 0
    for name in modules:
        if name in ("lm_head", "embed_tokens", "wte", "embed_out"):
            total += shape.vocab_size * shape.hidden_size
        else:
            notes.append(f"lora_modules_to_save: '{name}' not modelled by the planner (not counted)")
    return total


def billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _millions(n: int) -> str:
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
        return AutoConfig.from_pretrained(name_or_path).get_text_config().to_dict()
    except Exception as err:  # offline, unknown id, gated repo...
        raise PlannerError(
            f"model_name_or_path: no config for '{name_or_path}': it is not in the local Hugging Face cache "
            f"and the hub did not answer ({type(err).__name__}; offline?). Download it once "
            f"(`hf download {name_or_path} config.json`), give a local directory with config.json, or use "
            f"one of the shipped architectures: {', '.join(shipped_architectures())}") from None
