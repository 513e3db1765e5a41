"""Sequence-chunked layers: each decoder layer's per-token modules see a bounded number of positions.

When the backward pass recomputes a checkpointed decoder layer, everything that layer saves for
its own backward is alive at once, for every position of the sequence: the MLP's gate, up and
product (3 x intermediate size per token), peft's fp32 copies of each adapted projection's
input, the norms' fp32 upcasts. At 32K tokens that is ~10 GB for Qwen3-8B, more than the model.

These modules act on each position on its own (norms, the attention's q/k/v/o projections and
per-head norms, the MLP), so running them over `sequence_chunk_size` positions at a time, each
chunk checkpointed, computes the same values while the layer's recompute keeps only each chunk's
input (a view of a tensor the layer holds anyway) and the module's output. The chunk's own
intermediates exist for one chunk at a time, when its backward recomputes it. The price is one
more forward of these modules in the backward pass. Attention itself is not chunked: it mixes
positions, and SDPA / flash kernels already keep memory linear in length.

Without gradients (generation, reference log-probs) the chunks simply run one after another,
which bounds the MLP's intermediate there too. Inputs no longer than a chunk (every decoding
step) take the unchanged path.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

# Per-token modules of a decoder layer, by the attribute names transformers' Llama/Qwen/Mistral/
# Gemma families use: the norms, the attention's projections and per-head q/k norms, the MLP.
PER_TOKEN_MODULES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
                     "q_norm", "k_norm", "mlp", "feed_forward")


def _chunked_forward(forward, chunk_size: int, *args, **kwargs):
    """`forward(hidden, ...)` over `chunk_size` positions (dimension 1 of `hidden`) at a time."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 3 or args[0].size(1) <= chunk_size:
        return forward(*args, **kwargs)  # a decoding step, a short input, or a call this wrapper does not know
    hidden, args = args[0], args[1:]
    grad = torch.is_grad_enabled()
    outputs = []
    for start in range(0, hidden.size(1), chunk_size):
        piece = hidden[:, start:start + chunk_size]
        if grad:
            outputs.append(checkpoint(forward, piece, *args, use_reentrant=False, **kwargs))
        else:
            outputs.append(forward(piece, *args, **kwargs))
    return torch.cat(outputs, dim=1)


def _per_token_modules(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost PER_TOKEN_MODULES inside `layer` (an MLP's own projections are covered by
    the MLP; peft's LoRA wrapper of a projection is the module found, not its base layer)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in PER_TOKEN_MODULES and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def install(model, chunk_size: int) -> int:
    """Run the per-token modules of every decoder layer of `model` over `chunk_size` positions at
    a time from now on; returns how many modules were chunked."""
    from lowvram_grpo.offload import checkpointed_layers

    if chunk_size < 1:
        raise ValueError(f"sequence_chunk_size must be at least 1, got {chunk_size}")
    modules = [m for layer in checkpointed_layers(model) for m in _per_token_modules(layer)]
    for module in modules:
        # The instance's forward: nn.Module.__call__ (and its hooks, peft's included) stays the same.
        module.forward = functools.partial(_chunked_forward, module.forward, chunk_size)
    return len(modules)


def is_chunked(model) -> bool:
    """Whether `install` has chunked `model`'s per-token modules."""
    return any(isinstance(m.__dict__.get("forward"), functools.partial) and m.forward.func is _chunked_forward
               for m in model.modules())
