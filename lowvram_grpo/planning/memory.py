"""Memory estimate: how much GPU memory a GRPO run needs, from the model's config alone.

No weights are loaded: everything is computed from the architecture (`config.json`: hidden
size, layers, heads, vocabulary...) and the run's settings (`TrainConfig`), for given chunk
sizes: `estimate_memory(model_config, train_config)` -> `MemoryEstimate`, a breakdown in bytes.
Choosing chunk sizes that fit a card, and printing the result, is planner.py's job; the
model's shape and parameter counts come from model_shape.py.

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram_grpo.config import AUTO, TrainConfig
from lowvram_grpo.planning.chunking import GENERATION, LOGPROBS, UPDATE
from lowvram_grpo.planning.model_shape import (
    QK_NORM_TYPES,
    ModelShape,
    ParamCounts,
    PlannerError,
    billions,
    count_parameters,
    lora_parameters,
    lora_targets,
    millions,
    resolve_model_config,
)
from lowvram_grpo.planning.vision_memory import vision_shape, vision_terms

GIB = 2**30

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

# Offloaded activations: the GPU holds the layer input being recomputed and the one prefetched
# for the next layer backward (offload.py).
OFFLOADED_ON_DEVICE = 2

# CPU memory a training process needs besides offloaded activations: Python, torch, the CUDA
# runtime and libraries, the tokenizer and data (3-4 GB resident on a GPU machine).
HOST_PROCESS_BYTES = 4 * GIB

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
    # CPU memory the run needs besides the GPU's: offloaded activations, the process itself.
    host_parts: dict[str, int] = field(default_factory=dict)
    # Generation's KV cache per token of one sequence (every attention layer, keys and values).
    kv_bytes_per_token: int = 0

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    @property
    def host_bytes(self) -> int:
        return sum(self.host_parts.values())

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
                    logprob_chunk_size: int | None = None, offload_activations: bool | None = None,
                    sequence_chunk_size: int | None | str = AUTO) -> MemoryEstimate:
    """Estimate the peak GPU memory (and the CPU memory offloading needs) of training
    `model_config` as `train_config` says.

    `model_config` is a config dict (config.json) or a transformers PretrainedConfig. The chunk
    sizes and the long-context settings default to the train config's ("auto" ones: off, the
    run as it is); plan() passes candidates instead.
    """
    shape = ModelShape.from_config(model_config)
    counts = count_parameters(shape)
    c = train_config
    full_config = model_config.to_dict() if hasattr(model_config, "to_dict") else model_config
    images = vision_shape(full_config, c.image_size)  # None for a text model
    sequences = c.sequences_per_step
    gen_chunk = min(generation_chunk_size or c.generation_chunk_size, sequences)
    micro = min(micro_batch_size or c.micro_batch_size, sequences)
    lp_chunk = logprob_chunk_size or c.logprob_chunk_size
    if offload_activations is None:
        offload_activations = c.offload_activations is True
    if sequence_chunk_size == AUTO:
        sequence_chunk_size = c.sequence_chunk_size if c.sequence_chunk_size != AUTO else None
    offload = offload_activations and c.gradient_checkpointing
    db = _dtype_bytes(c)
    seq = c.max_prompt_length + c.max_completion_length  # worst case: every completion runs to max_completion_length
    notes: list[str] = []

    static, weights_bytes = _weight_parts(shape, counts, db, c.quantization)
    lora, lora_notes = lora_parameters(shape, c)
    notes += lora_notes
    saved_modules = _modules_to_save_params(shape, c.lora_modules_to_save, notes)
    adapter, optimizer = _adapter_parts(c, lora, saved_modules, db)
    static.update(adapter)
    static["CUDA context + cuBLAS workspace (constant)"] = CUDA_OVERHEAD_BYTES

    # DEQUANT_TERM: the largest linear layer exists once in the compute dtype, transiently.
    largest_linear = max(i * o for i, o in shape.all_linear_shapes().values())
    dequant = {DEQUANT_TERM: largest_linear * db} if c.quantization == "nf4" else {}
    host: dict[str, int] = {}
    common = _update_common_parts(shape, c, micro, lora * 4 + saved_modules * db, db, offload, host)
    rows = min(lp_chunk, micro * c.max_completion_length)  # the LM head runs on completion positions only
    update_head = {**common, f"LM-head chunk ({rows} positions x {shape.vocab_size} vocab, fp32)":
                   rows * shape.vocab_size * (db + LOGPROB_FP32_COPIES * 4)}
    update_layers = _update_layer_parts(shape, c, micro, common, db, offload, sequence_chunk_size, notes)
    phases = {GENERATION: {**_generation_parts(shape, c, gen_chunk, db, sequence_chunk_size), **dequant},
              LOGPROBS: _logprob_parts(shape, c, micro, lp_chunk, db, sequence_chunk_size, dequant),
              f"{UPDATE}: LM head": update_head, f"{UPDATE}: layers": {**update_layers, **dequant}}
    # model: rewards stay loaded for the whole run and run between generation and update.
    reward_static, reward_phase = reward_model_memory(c, db)
    static.update(reward_static)
    if reward_phase:
        phases["reward model"] = reward_phase
    if images is not None:  # an image-text model: its vision tower, and encoding one prompt's image
        vision_static, vision_phases, vision_notes = vision_terms(images, c, db, NF4_BYTES_PER_PARAM)
        static.update(vision_static)
        weights_bytes += sum(vision_static.values())
        for phase, parts in vision_phases.items():
            phases[phase].update(parts)
        notes += vision_notes
    if c.beta == 0 and c.num_iterations == 1:
        del phases[LOGPROBS]  # no frozen log-probs are computed at all
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    parts = {**static, **{f"[{peak_phase}] {k}": v for k, v in phases[peak_phase].items()}}
    host["Python, torch and the CUDA runtime (constant)"] = HOST_PROCESS_BYTES
    return MemoryEstimate(
        parts=parts, phases=phases, peak_phase=peak_phase, static_bytes=sum(static.values()),
        total_bytes=sum(parts.values()), weights_bytes=weights_bytes, optimizer_bytes=optimizer,
        params=counts, lora_params=lora,
        settings={"generation_chunk_size": gen_chunk, "micro_batch_size": micro, "logprob_chunk_size": lp_chunk,
                  "seq_len": seq, "dtype_bytes": db, "offload_activations": offload,
                  "sequence_chunk_size": sequence_chunk_size},
        notes=notes, host_parts=host, kv_bytes_per_token=kv_bytes_per_token(shape, db, seq))


def _weight_parts(shape: ModelShape, counts: ParamCounts, db: int, quantization: str) -> tuple[dict[str, int], int]:
    """The base model's weights as loaded, by part, and their total."""
    static: dict[str, int] = {}
    if quantization == "nf4":
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
    return static, sum(static.values())


def _adapter_parts(c: TrainConfig, lora: int, saved_modules: int, db: int) -> tuple[dict[str, int], int]:
    """What training adds for the whole run: the LoRA weights, fully trained modules and the
    optimizer's states, by part; and the optimizer's bytes."""
    parts: dict[str, int] = {}
    # peft keeps adapter weights in fp32 on a 16-bit/4-bit base (see model.py).
    parts[f"LoRA weights, fp32 (r={c.lora_r}, {millions(lora)} params)"] = lora * 4
    if saved_modules:
        parts[f"modules_to_save copies ({millions(saved_modules)} params)"] = saved_modules * db
    if c.optimizer == "paged_adamw_8bit":
        optimizer = round((lora + saved_modules) * ADAM8BIT_BYTES_PER_PARAM)
        parts["optimizer: paged 8-bit AdamW states (~2 bytes/param)"] = optimizer
    else:
        # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype.
        optimizer = lora * 8 + saved_modules * 2 * db
        parts["optimizer: AdamW states (2 x fp32 per LoRA param)"] = optimizer
    return parts, optimizer


def _generation_parts(shape: ModelShape, c: TrainConfig, gen_chunk: int, db: int,
                      sequence_chunk_size: int | None) -> dict[str, int]:
    """Phase 1: the generation of one chunk of `gen_chunk` sequences.

    K and V for every attention layer, every position, every sequence of the chunk; a
    sliding-window layer keeps only its window (transformers' sliding cache layers drop older
    positions); a convolution layer keeps its last few inputs instead.
    """
    prompt, seq = c.max_prompt_length, c.max_prompt_length + c.max_completion_length
    kv_bytes = 2 * shape.num_kv_heads * shape.head_dim * db
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
            gen_chunk * conv_layers * shape.hidden_size * shape.conv_kernel * db
    if full_layers or sliding_layers:
        # The cache grows by concatenation: for a moment one layer's keys or values exist twice.
        generation["KV cache growth (one layer's keys copied)"] = gen_chunk * seq * kv_bytes // 2
    # With tools, each later turn prefills the whole trajectory so far, tool results included
    # (agent/loop.py starts every turn from the token ids, not from the previous turn's cache).
    prefill = seq if (c.tools or c.environment_factory) else prompt
    what = "prompt + trajectory with tool results" if prefill == seq else "prompt"
    generation.update({
        # The prefill runs one layer at a time without gradients: the widest moment is the MLP.
        f"prefill activations (one layer, {gen_chunk} x {prefill} tokens: {what})":
            _nograd_layer_bytes(shape, db, gen_chunk, prefill, sequence_chunk_size),
        "sampling logits (fp32)": gen_chunk * shape.vocab_size * 4 * SAMPLING_FP32_COPIES,
    })
    return generation


def _logprob_parts(shape: ModelShape, c: TrainConfig, micro: int, lp_chunk: int, db: int,
                   sequence_chunk_size: int | None, dequant: dict[str, int]) -> dict[str, int]:
    """Phase 2: reference / old-policy log-probs of one micro-batch, no gradients."""
    seq = c.max_prompt_length + c.max_completion_length
    tokens, V = micro * seq, shape.vocab_size
    rows = min(lp_chunk, micro * c.max_completion_length)  # the LM head runs on completion positions only
    reference = {
        f"forward activations (one layer, {micro} x {seq} tokens)":
            _nograd_layer_bytes(shape, db, micro, seq, sequence_chunk_size),
        "final hidden states": tokens * shape.hidden_size * db,
        f"LM-head chunk ({rows} positions x {V} vocab)": rows * V * 4 * LOGPROB_FP32_COPIES_NO_GRAD,
        **dequant,
    }
    if micro > 1:
        # Rows of different lengths need a padding mask: SDPA gets it as a (B, 1, T, T) boolean.
        reference[f"attention mask ({micro} x {seq} x {seq}, bool)"] = micro * seq * seq
    return reference


def _update_common_parts(shape: ModelShape, c: TrainConfig, micro: int, gradient_bytes: int, db: int,
                         offload: bool, host: dict[str, int]) -> dict[str, int]:
    """Phases 3 and 4, the update of one micro-batch with gradients: what both hold.

    Autograd runs the LM head's chunks backward first, then the decoder layers, so the LM-head
    chunk and the recomputed layer are never alive together: two phases. `gradient_bytes` are
    the LoRA (and modules_to_save) gradients; offloaded layer inputs go to `host`.
    """
    H, L, completion = shape.hidden_size, shape.num_layers, c.max_completion_length
    seq = c.max_prompt_length + completion
    tokens = micro * seq
    common: dict[str, int] = {}
    if offload:
        # In pinned CPU memory instead; the GPU holds the ones being brought back (below).
        host[f"offloaded layer inputs ({micro} x {seq} tokens x {L} layers, pinned)"] = tokens * H * db * L
    elif c.gradient_checkpointing:
        common[f"checkpointed layer inputs ({micro} x {seq} tokens x {L} layers)"] = tokens * H * db * L
    if micro > 1:
        common[f"attention mask ({micro} x {seq} x {seq}, bool)"] = micro * seq * seq
    # The final norm's output (and its fp32 upcast), the completion positions sliced out of it
    # for the LM head, and their gradients.
    common["final hidden states (+ gradients)"] = 2 * (tokens + micro * completion) * H * db + tokens * H * 4
    # Gradients accumulate over micro-batches, so they exist from the first backward on.
    common["LoRA gradients (fp32)"] = gradient_bytes
    # Token ids and masks of the micro-batch, and per-token reference/old log-probs of the step.
    frozen_copies = (1 if c.beta > 0 else 0) + (1 if c.num_iterations > 1 else 0)
    common["rollout tensors (ids, masks, frozen log-probs)"] = \
        tokens * 8 * 2 + c.sequences_per_step * completion * 4 * (frozen_copies + 2)
    return common


def _update_layer_parts(shape: ModelShape, c: TrainConfig, micro: int, common: dict[str, int], db: int,
                        offload: bool, sequence_chunk_size: int | None, notes: list[str]) -> dict[str, int]:
    """Phase 4, the update's decoder layers in backward: `common` and the layer recomputed
    (whole, or its per-token modules in chunks of positions), or every layer's activations."""
    H, L = shape.hidden_size, shape.num_layers
    seq = c.max_prompt_length + c.max_completion_length
    tokens = micro * seq
    layers = dict(common)
    chunked = c.gradient_checkpointing and bool(sequence_chunk_size) and sequence_chunk_size < seq
    if chunked:
        # By the time backward reaches the layers the LM head's and the final norm's tensors are
        # gone; what crosses a layer boundary is the gradient arriving at its output and the one
        # leaving for its input. (The unchunked layer's count was calibrated with the final
        # hidden states in, so it keeps them.)
        del layers["final hidden states (+ gradients)"]
        layers["gradients at the layer's output and input"] = 2 * tokens * H * db
    layer_bytes = _train_layer_bytes_per_token(shape, db, c)
    if offload:
        layers[f"layer inputs back from CPU memory ({OFFLOADED_ON_DEVICE} layers)"] = \
            tokens * H * db * OFFLOADED_ON_DEVICE
    if chunked:
        positions = micro * sequence_chunk_size
        layers[f"one layer recomputed, per-token modules in chunks of {sequence_chunk_size} positions"] = \
            tokens * _chunked_layer_bytes_per_token(shape, db)
        layers[f"one chunk's modules recomputed in backward ({micro} x {sequence_chunk_size} positions)"] = \
            positions * layer_bytes
    elif c.gradient_checkpointing:
        layers["one layer recomputed in backward (+ its gradients)"] = tokens * layer_bytes
    else:
        layers[f"activations of all {L} layers (no gradient checkpointing)"] = tokens * layer_bytes * L
        notes.append("gradient_checkpointing is off: every layer's activations are kept; "
                     "turn it on to save most of them")
    return layers


def _nograd_layer_bytes_per_token(shape: ModelShape, db: int) -> int:
    """Widest moment of one decoder layer's forward without autograd: the residual stream,
    its normed copy and the MLP's gate, up and product, plus peft's fp32 copy of the
    down-projection's input (LoRA adapters run in fp32)."""
    H, I = shape.hidden_size, shape.active_intermediate_size
    return db * (3 * H + 3 * I) + 4 * I


def _nograd_layer_bytes(shape: ModelShape, db: int, rows: int, length: int, sequence_chunk_size: int | None) -> int:
    """One decoder layer's forward without autograd for `rows` sequences of `length` tokens.
    With sequence chunking the MLP's width exists for one chunk of positions only; the residual
    stream, its normed copy and the attention's q, k, v and output span the whole length."""
    if not sequence_chunk_size or sequence_chunk_size >= length:
        return rows * length * _nograd_layer_bytes_per_token(shape, db)
    H, I = shape.hidden_size, shape.active_intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    whole = db * (3 * H + 2 * q + 2 * kv)
    chunk = db * (H + 3 * I) + 4 * I
    return rows * (length * whole + sequence_chunk_size * chunk)


def kv_bytes_per_token(shape: ModelShape, db: int, length: int) -> int:
    """Generation's KV cache per token of one sequence `length` tokens long, averaged over the
    length (sliding-window layers stop growing at their window; convolution layers keep none)."""
    per_layer = 2 * shape.num_kv_heads * shape.head_dim * db
    full, sliding = shape.layer_kinds.count("full"), shape.layer_kinds.count("sliding")
    window = min(length, shape.sliding_window or length)
    return per_layer * full + per_layer * sliding * window // max(length, 1)


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
    targets, _ = lora_targets(c.lora_target_modules, shapes)
    lora_inputs = sum(shapes[t][0] for t in targets) * 4 * (2 if c.lora_dropout > 0 else 1)
    lora_rank = len(targets) * c.lora_r * 4  # A's output, kept for B's gradient
    # (B's fp32 output, its scaled and cast copies are transient: no later op keeps them.)
    return norms + attention + mlp + lora_inputs + lora_rank


def _chunked_layer_bytes_per_token(shape: ModelShape, db: int) -> int:
    """Bytes per token of one decoder layer recomputed in backward when its per-token modules
    run over chunks of positions (sequence_chunks.py): what spans the whole sequence is only
    what the chunked modules take in and give out and what attention keeps, not their insides.

    At the peak (counted op by op on the CPU, see tests/test_memory.py): three hidden-sized
    tensors (the input's norm, the residual after attention and its norm), three query-sized
    (q, the rotary q, SDPA's output or the o-projection's input) and three key/value-sized
    (k, v, the rotary k), and with per-head q/k norms (Qwen3) their outputs; the gradients
    flowing back inside the layer fit in what has been freed by then.
    """
    H = shape.hidden_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    qk_norms = q + kv if shape.model_type in QK_NORM_TYPES else 0  # their outputs feed the rotary q and k
    return db * (3 * H + 3 * q + 3 * kv + qk_norms)


def _modules_to_save_params(shape: ModelShape, modules: list[str], notes: list[str]) -> int:
    """Parameters of fully trained modules (peft's modules_to_save), e.g. lm_head."""
    total = 0
    for name in modules:
        if name in ("lm_head", "embed_tokens", "wte", "embed_out"):
            total += shape.vocab_size * shape.hidden_size
        else:
            notes.append(f"lora_modules_to_save: '{name}' not modelled by the planner (not counted)")
    return total


def reward_model_names(config: TrainConfig) -> list[str]:
    return [spec.name.removeprefix("model:") for spec in config.rewards
            if isinstance(spec.name, str) and spec.name.startswith("model:")]


def reward_model_memory(train_config: TrainConfig, dtype_bytes: int) -> tuple[dict[str, int], dict[str, int]]:
    """(static parts, "reward model" phase parts) in bytes for the config's `model:` rewards.

    Static: the weights, as loaded (NF4 linears on a GPU by default, everything else 16-bit);
    a sequence classifier has no LM head, only a one-label score head. Phase: one no-grad
    forward of `reward_model_batch_size` sequences at the longest length, the widest layer at a
    time, plus the dequantised largest linear; reward models are scored one after the other.
    """
    static, phase = {}, {}
    batch = train_config.reward_model_batch_size
    tokens = batch * (train_config.max_prompt_length + train_config.max_completion_length + 128)
    for name in reward_model_names(train_config):
        try:
            model_config: Any = resolve_model_config(name)
            shape = ModelShape.from_config(model_config)
        except PlannerError as err:
            raise PlannerError(f"rewards: model:{name}: {err}") from None
        counts = count_parameters(shape)
        rest = counts.embedding + counts.other + shape.hidden_size  # + the score head
        if train_config.reward_model_quantization == "nf4":
            weights = round(counts.linear * NF4_BYTES_PER_PARAM) + rest * dtype_bytes
            largest = max(i * o for i, o in shape.linear_shapes().values()) * dtype_bytes
        else:
            weights, largest = (counts.linear + rest) * dtype_bytes, 0
        label = Path(name.rstrip("/")).name
        static[f"reward model {label} weights ({billions(counts.total - counts.lm_head)} params)"] = weights
        forward = tokens * (_nograd_layer_bytes_per_token(shape, dtype_bytes) + shape.hidden_size * dtype_bytes)
        phase_bytes = forward + largest
        if phase_bytes > sum(phase.values()):  # one model at a time: the largest one counts
            phase = {f"reward model {label} forward ({batch} seq, one layer at a time)": forward}
            if largest:
                phase[DEQUANT_TERM] = largest
    return static, phase
