"""Long sequences (issue 25): offloaded activations and sequence-chunked layers compute the same
gradients as the plain run, and a run with them resumes exactly.

The built-in tiny model (a real Qwen2 architecture) with gradient checkpointing, on the CPU: there
"offloading" copies each checkpointed layer input to another CPU tensor and back, which runs the
same pack/unpack path as on a GPU but for the side stream.
"""

from __future__ import annotations

import pytest
import torch

from lowvram_grpo import logprobs, offload, sequence_chunks
from lowvram_grpo.config import TrainConfig
from lowvram_grpo.model import enable_long_context, load_policy


def _config(tmp_path, **overrides) -> TrainConfig:
    values = dict(model_name_or_path="builtin:tiny", output_dir=str(tmp_path / "run"), dtype="float32")
    values.update(overrides)
    return TrainConfig(**values)


def _policy(config):
    torch.manual_seed(0)
    policy, _ = load_policy(config, torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at zero: give every LoRA weight a gradient
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.train()
    return policy


def _lora_gradients(policy, input_ids, keep: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA gradients of a weighted sum of the completion log-probs (dropout seeded alike)."""
    policy.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logps, _ = logprobs.sequence_logprobs(policy, input_ids, torch.ones_like(input_ids), keep, chunk_size=16)
    weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
    (logps * weights).sum().backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def _assert_close(actual: dict, expected: dict) -> None:
    """Equal up to float rounding: the chunks' matmuls add in another order."""
    for name in expected:
        scale = expected[name].abs().max()
        assert (actual[name] - expected[name]).abs().max() <= 1e-5 * scale, name


def _batch(length: int = 48, rows: int = 2) -> torch.Tensor:
    return torch.randint(3, 19, (rows, length), generator=torch.Generator().manual_seed(1))


def test_offloaded_activations_give_exactly_the_same_lora_gradients(tiny_cache, tmp_path):
    config = _config(tmp_path)  # lora_dropout 0.05: the recompute must replay the same masks
    policy = _policy(config)
    ids = _batch()
    plain = _lora_gradients(policy, ids, keep=32)
    offloader = offload.install(policy)
    offloaded = _lora_gradients(policy, ids, keep=32)
    assert plain.keys() == offloaded.keys() and len(plain) > 0
    for name in plain:
        assert torch.equal(plain[name], offloaded[name]), name
    # Every decoder layer's input went through the host copy: 2 rows x 48 tokens x 128 x 4 bytes each.
    layers = len(offload.checkpointed_layers(policy))
    assert offloader.peak_host_bytes == layers * ids.numel() * 128 * 4
    assert offloader.host_bytes == 0  # released after the backward pass


def test_sequence_chunked_layers_give_the_same_gradients_within_float_tolerance(tiny_cache, tmp_path):
    config = _config(tmp_path, lora_dropout=0.0)  # dropout would draw other masks per chunk
    policy = _policy(config)
    ids = _batch(length=50)  # chunks of 16, 16, 16 and 2 positions
    plain = _lora_gradients(policy, ids, keep=40)
    with torch.no_grad():
        plain_logps, _ = logprobs.sequence_logprobs(policy, ids, torch.ones_like(ids), 40)
    chunked_modules = sequence_chunks.install(policy, 16)
    # Per layer: 2 norms, q/k/v/o projections and the MLP.
    assert chunked_modules == len(offload.checkpointed_layers(policy)) * 7
    chunked = _lora_gradients(policy, ids, keep=40)
    with torch.no_grad():
        chunked_logps, _ = logprobs.sequence_logprobs(policy, ids, torch.ones_like(ids), 40)
    torch.testing.assert_close(chunked_logps, plain_logps, rtol=1e-5, atol=1e-5)
    _assert_close(chunked, plain)
    assert any(g.abs().max() > 1e-3 for g in plain.values())  # gradients that say something


def test_both_together_match_the_plain_run(tiny_cache, tmp_path):
    config = _config(tmp_path, lora_dropout=0.0)
    policy = _policy(config)
    ids = _batch(length=40)
    plain = _lora_gradients(policy, ids, keep=24)
    enable_long_context(policy, offload_activations=True, sequence_chunk_size=8)
    both = _lora_gradients(policy, ids, keep=24)
    _assert_close(both, plain)


def test_offloading_needs_gradient_checkpointing(tiny_cache, tmp_path):
    config = _config(tmp_path, gradient_checkpointing=False, offload_activations=False)
    policy = _policy(config)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        offload.install(policy)


def test_a_run_with_both_on_resumes_exactly_and_logs_what_it_offloaded(tiny_cache, tmp_path):
    """Train 4 steps straight, and 2 steps then 2 more from the checkpoint: the same adapter,
    bit for bit, with offloading and chunked layers on (dropout on: the recomputes replay it)."""
    from safetensors.torch import load_file

    from lowvram_grpo import rundir
    from lowvram_grpo.config import load_config
    from lowvram_grpo.trainer import train

    def config(name: str, steps: int) -> TrainConfig:
        return load_config(preset="tiny-cpu", overrides={
            "output_dir": str(tmp_path / name), "max_steps": steps, "save_every": 2, "prompts_per_step": 2,
            "num_generations": 4, "micro_batch_size": 4, "lora_dropout": 0.05, "eval_fraction": 0.0,
            "offload_activations": True, "sequence_chunk_size": 8})

    train(config("straight", 4), progress=False)
    train(config("resumed", 2), progress=False)
    train(config("resumed", 4), resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = rundir.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # Each step's offloaded layer inputs: 2 layers x one micro-batch x its tokens x 128 x 4 bytes.
    assert all(0 < r["offloaded_activations_gb"] * 2**30 <= 2 * 4 * 20 * 128 * 4 for r in records)
    assert all(r["generation/kv_cache_gb"] > 0 for r in records)
