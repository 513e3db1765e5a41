"""Per-token log-probabilities of completions, chunked: never the full (B, T, V) logits.

For a 150k vocabulary that tensor, in fp32, is the single largest allocation of a GRPO step.
`sequence_logprobs` runs the backbone once and the LM head over `chunk_size` positions at a
time (checkpointed under autograd), applying the model's own logit scale and soft-cap as TRL does.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lowvram_grpo.offload import activation_memory


def _unwrap_causal_lm(model):
    """The transformers CausalLM under an optional peft PeftModel wrapper.

    peft injects LoRA layers *in place* into the CausalLM's modules, so calling that CausalLM's
    backbone directly still runs the adapters (and honours `disable_adapter()`).
    """
    get_base_model = getattr(model, "get_base_model", None)  # only PeftModel has it
    return get_base_model() if callable(get_base_model) else model


def _logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) the model's own forward applies to its logits, looked up like TRL does.

    Most models have neither. Cohere multiplies by `logit_scale`, Granite divides by
    `logits_scaling`, Falcon-H1 multiplies by `lm_head_multiplier`, Gemma 2/3 soft-cap.
    Missing these would silently give log-probs of a different distribution than the one sampled.
    """
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None) if scale is None else scale
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def _head_logprobs(head, hidden, targets, temperature, logit_scale, softcap, compute_entropy, entropy_grad=False):
    """log p(target) for one chunk of positions: LM head -> fp32 -> log_softmax -> gather.

    This is the only place (rows, V) logits exist, and only for `rows = chunk_size` positions.
    """
    logits = head(hidden).float()  # fp32 log_softmax: bf16 log-probs are too coarse for ratios
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:  # Gemma-2 style soft-capping, applied before the temperature like TRL
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    token_logps = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not compute_entropy:
        return token_logps, None
    if entropy_grad:  # the entropy bonus (entropy_coef) trains on it
        return token_logps, -(logprobs.exp() * logprobs).sum(-1)
    with torch.no_grad():  # otherwise entropy is only a metric: keep it out of the graph
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return token_logps, entropy


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
    compute_entropy: bool = False,
    entropy_grad: bool = False,
    model_inputs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the last `logits_to_keep` tokens, without full (B, T, V) logits.

    Args:
        model: a transformers CausalLM, or a peft PeftModel wrapping one (4-bit bases included).
        input_ids, attention_mask: (B, L) prompt + completion, prompts left-padded.
        logits_to_keep: K, the completion length; the tokens scored are input_ids[:, -K:].
        temperature: logits are divided by it, so the log-probs are those of the distribution
            the completions were sampled from.
        chunk_size: rows (flattened B*K positions) projected through the LM head at a time.
        compute_entropy: also return the per-token entropy (for logging and top_entropy_quantile).
        entropy_grad: let gradients flow through that entropy (for the entropy bonus, entropy_coef).
        model_inputs: extra forward inputs, e.g. an image-text model's pixel_values and
            image_grid_thw for these rows (see Rollout.forward_inputs); the model's own
            multimodal backbone then merges the image features into the token embeddings.

    Returns:
        (logps (B, K) float32, entropy (B, K) or None). Padding positions get a (meaningless)
        log-prob too; callers mask them with the completion mask.

    The backbone runs once; the LM head then runs on `chunk_size` positions at a time. Under
    autograd each chunk is checkpointed, so backward recomputes one chunk's logits at a time
    instead of keeping all of them alive: peak memory is O(chunk_size * V), not O(B * K * V).
    """
    causal_lm = _unwrap_causal_lm(model)
    backbone, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    logit_scale, softcap = _logit_transform(causal_lm.config.get_text_config())

    if model_inputs:
        # The image-text model's backbone (vision tower + language model), not only its decoder.
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    with activation_memory(model):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          **(model_inputs or {})).last_hidden_state
    # The hidden state at position t predicts token t+1, hence the shift by one.
    hidden = hidden[:, -logits_to_keep - 1 : -1, :]
    batch, keep, width = hidden.shape
    hidden = hidden.reshape(batch * keep, width)
    targets = input_ids[:, -logits_to_keep:].reshape(-1)

    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    logps, entropies = [], []
    for start in range(0, hidden.size(0), chunk_size):
        args = (head, hidden[start : start + chunk_size], targets[start : start + chunk_size],
                temperature, logit_scale, softcap, compute_entropy, entropy_grad)
        if use_checkpoint:
            chunk_logps, chunk_entropy = checkpoint(_head_logprobs, *args, use_reentrant=False)
        else:
            chunk_logps, chunk_entropy = _head_logprobs(*args)
        logps.append(chunk_logps)
        entropies.append(chunk_entropy)

    logps = torch.cat(logps).view(batch, keep)
    entropy = torch.cat(entropies).view(batch, keep) if compute_entropy else None
    return logps, entropy
