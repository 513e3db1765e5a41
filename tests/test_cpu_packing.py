"""bitsandbytes' CPU inference repacking never reaches a model that trains, on any CPU.

On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight on its first eval-mode, no-grad
forward, and every later forward (training included) then has no autograd path through that
weight (lowvram_grpo/quantization.py). These tests do not depend on the CPU they run on: each
runs twice, with bitsandbytes told that the CPU has the feature and that it has not. Where the
CPU really has it, the rest of the suite (oracle, architectures, exact resume) runs on it too.
"""

import os
import subprocess
import sys
import textwrap

import bitsandbytes
import pytest
import torch

from lowvram_grpo import logprobs
from lowvram_grpo.config import load_config
from lowvram_grpo.model import load_policy
from lowvram_grpo.quantization import is_packed_for_cpu_inference
from lowvram_grpo.rollout import generate_rollouts

CPU_HAS_FEATURE = bool(bitsandbytes.functional.has_avx512bf16())


@pytest.fixture(params=["feature reported", "feature absent"])
def reported_feature(request, monkeypatch):
    """bitsandbytes' view of the CPU, forced: Linear4bit reads it when it is built."""
    reported = request.param == "feature reported"
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: reported)
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: reported)
    return reported


@pytest.fixture
def repackings(monkeypatch):
    """Counts the calls of bitsandbytes' repacking (and still repacks, as it would)."""
    calls = []
    repack = bitsandbytes.nn.modules._convert_weight_packed_for_cpu

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return repack(*args, **kwargs)

    monkeypatch.setattr(bitsandbytes.nn.modules, "_convert_weight_packed_for_cpu", counting)
    return calls


def _config(tiny_path):
    return load_config(overrides={"model_name_or_path": str(tiny_path), "lora_dropout": 0.0,
                                  "max_completion_length": 6, "max_prompt_length": 32})


def _lora_gradients(policy, tokenizer, generate_first: bool) -> dict[str, torch.Tensor]:
    """LoRA gradients of a log-prob sum, after (or without) a generation as a step makes one."""
    ids = tokenizer(["2+3=", "4+4="], return_tensors="pt", padding=True)
    if generate_first:
        generate_rollouts(policy, tokenizer, ["1+1="], num_generations=2, chunk_size=2, max_prompt_length=32,
                          max_completion_length=4)
    policy.train()
    policy.zero_grad()
    logps, _ = logprobs.sequence_logprobs(policy, ids.input_ids, ids.attention_mask, 2)
    logps.sum().backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_a_training_policy_is_never_repacked(tiny_path, reported_feature, repackings):
    policy, tokenizer = load_policy(_config(tiny_path), torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at zero, which would leave LoRA A without a gradient
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    reference = _lora_gradients(policy, tokenizer, generate_first=False)
    after_generation = _lora_gradients(policy, tokenizer, generate_first=True)

    assert repackings == [], "generation repacked the 4-bit weights of a model that trains"
    assert not is_packed_for_cpu_inference(policy)
    assert all(g.abs().sum() > 0 for g in reference.values()), "every LoRA weight should get a gradient"
    for name, grad in reference.items():
        torch.testing.assert_close(after_generation[name], grad, rtol=0, atol=0, msg=name)


def test_an_inference_only_model_keeps_the_repacking_where_the_cpu_has_it(tiny_path, reported_feature, repackings):
    if reported_feature and not CPU_HAS_FEATURE:
        pytest.skip("the packed layout's kernel exists only on CPUs that have AVX512-BF16")
    policy, tokenizer = load_policy(_config(tiny_path), torch.device("cpu"), inference_only=True)
    rollout = generate_rollouts(policy, tokenizer, ["1+1="], num_generations=2, chunk_size=2, max_prompt_length=32,
                                max_completion_length=4, do_sample=False)

    assert is_packed_for_cpu_inference(policy) == reported_feature
    assert bool(repackings) == reported_feature
    assert rollout.completion_ids.shape[0] == 2


def test_importing_bitsandbytes_asks_no_hub_for_kernels():
    """Run in a fresh process, with bitsandbytes' CPU backend re-imported as on an AVX512-BF16
    CPU (whatever this one has): no connection is attempted and no kernels-community line shows."""
    script = textwrap.dedent("""
        import importlib, socket
        attempts = []
        def no_network(*args, **kwargs):
            attempts.append(args)
            raise OSError("no network in this test")
        socket.socket.connect = no_network
        socket.create_connection = no_network

        from lowvram_grpo.quantization import _no_hub_kernels, import_bitsandbytes
        bnb = import_bitsandbytes()
        bnb.functional.has_avx512bf16 = lambda: True
        with _no_hub_kernels():
            importlib.reload(importlib.import_module("bitsandbytes.backends.cpu.ops"))
        print("connection attempts:", len(attempts))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "connection attempts: 0" in output
    assert "kernels-community" not in output


def test_bare_bitsandbytes_import_would_ask_the_hub():
    """The check above is not vacuous: without the guard, the same re-import does ask."""
    script = textwrap.dedent("""
        import importlib
        import kernels
        asked = []
        kernels.get_kernel = lambda repo, *a, **k: asked.append(repo) or (_ for _ in ()).throw(OSError("offline"))
        import bitsandbytes
        bitsandbytes.functional.has_avx512bf16 = lambda: True
        importlib.reload(importlib.import_module("bitsandbytes.backends.cpu.ops"))
        print("asked the hub:", "kernels-community/quantization-bitsandbytes" in asked)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "asked the hub: True" in result.stdout, result.stdout + result.stderr
