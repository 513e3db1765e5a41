"""Tests for lowvram_grpo.planning.memory: the planner's arithmetic, its choices, the shipped
architecture configs and the `lowvram-grpo plan` command.

Everything is computed from configs: no weights are loaded and no GPU is needed. The shipped
configs are also instantiated on the meta device (shapes only, no memory) so the planner's
parameter count is checked against the real transformers architecture, not only against itself.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lowvram_grpo.config import TrainConfig, load_config
from lowvram_grpo.planning import memory, model_shape, planner
from lowvram_grpo.planning.memory import GIB, estimate_memory
from lowvram_grpo.planning.model_shape import (
    PlannerError,
    count_parameters,
    load_arch,
    resolve_model_config,
    shipped_architectures,
)
from lowvram_grpo.planning.planner import format_plan, plan

# Published sizes (model cards / Hub "Model size") of the shipped architectures.
PUBLISHED_PARAMS = {
    "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.62e9,
    "llama-3.2-3b": 3.21e9, "llama-3.1-8b": 8.03e9,
    "qwen3-0.6b": 0.6e9, "qwen3-1.7b": 1.7e9, "qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9, "qwen3-14b": 14.8e9,
    "qwen3-30b-a3b": 30.5e9, "smollm3-3b": 3.08e9, "lfm2-1.2b": 1.17e9,
    # Gemma 3 4B is 4.3B with its 0.42B SigLIP vision tower; the planner models the language model.
    "gemma-3-4b": 4.3e9 - 0.42e9,
    # Image-text checkpoints shipped whole: the language model plus the vision tower.
    "qwen2.5-vl-3b": 3.75e9, "qwen3-vl-8b": 8.77e9,
}


def config(**overrides) -> TrainConfig:
    """A GPU-sized run: 2 prompts x G=8, prompt 256 + completion 1024 tokens."""
    values = dict(prompts_per_step=2, num_generations=8, max_prompt_length=256, max_completion_length=1024,
                  generation_chunk_size=8, micro_batch_size=4, logprob_chunk_size=256)
    values.update(overrides)
    return TrainConfig(**values)


# --- shipped architectures ----------------------------------------------------------------------


def test_every_expected_architecture_is_shipped():
    assert set(shipped_architectures()) == set(PUBLISHED_PARAMS)


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMS))
def test_arch_json_is_a_transformers_config_with_the_published_size(arch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from lowvram_grpo.planning.vision_memory import vision_shape

    values = load_arch(arch)
    hf_config = AutoConfig.for_model(**values)
    assert hf_config.model_type == values["model_type"]
    assert type(hf_config).__name__.lower().replace("_", "").startswith(values["model_type"].replace("_", ""))

    images = vision_shape(values, None)  # an image-text checkpoint: its vision tower counts too
    counted = count_parameters(values).total + (images.tower_params if images else 0)
    assert counted == pytest.approx(PUBLISHED_PARAMS[arch], rel=0.02)

    # The planner's formula against the real module tree (meta device: shapes, no memory).
    with torch.device("meta"):
        model = (AutoModelForImageTextToText if images else AutoModelForCausalLM).from_config(hf_config)
    assert counted == sum(p.numel() for p in model.parameters())  # tied weights count once


def test_arch_files_carry_the_keys_the_planner_and_bench_need():
    for arch in shipped_architectures():
        raw = json.loads((model_shape.ARCH_DIR / f"{arch}.json").read_text())
        assert "architectures" in raw and "model_type" in raw, arch
        raw = raw.get("text_config", raw)  # an image-text checkpoint's language model
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
                    "max_position_embeddings", "rope_theta"):
            assert key in raw, f"{arch}: {key}"


# --- resolving names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, arch", [
    ("qwen2.5-7b", "qwen2.5-7b"),
    ("Qwen2.5-7B", "qwen2.5-7b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-1.5b"),
    ("unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit", "qwen2.5-0.5b"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("meta-llama/Meta-Llama-3.1-8B", "llama-3.1-8b"),
    ("meta-llama/Llama-3.2-3B-Instruct", "llama-3.2-3b"),
])
def test_names_and_hub_ids_resolve_to_shipped_configs(name, arch):
    assert resolve_model_config(name) == load_arch(arch)


def test_local_directory_and_builtin_tiny_resolve(tmp_path, tiny_path):
    (tmp_path / "config.json").write_text(json.dumps(load_arch("qwen2.5-0.5b")))
    assert resolve_model_config(str(tmp_path))["hidden_size"] == 896
    assert resolve_model_config("builtin:tiny") == json.loads((tiny_path / "config.json").read_text())


def test_a_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(PlannerError, match="config.json"):
        resolve_model_config(str(tmp_path))


def test_estimate_accepts_a_transformers_config():
    from transformers import AutoConfig

    values = load_arch("qwen2.5-1.5b")
    from_dict = estimate_memory(values, config())
    from_object = estimate_memory(AutoConfig.for_model(**values), config())
    assert from_dict.total_bytes == from_object.total_bytes


# --- the estimate -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMS))
@pytest.mark.parametrize("overrides", [{}, {"gradient_checkpointing": False}, {"optimizer": "paged_adamw_8bit"},
                                       {"quantization": "none"}, {"beta": 0.0}, {"lora_dropout": 0.1}])
def test_parts_sum_to_total(arch, overrides):
    estimate = estimate_memory(load_arch(arch), config(**overrides))
    assert sum(estimate.parts.values()) == estimate.total_bytes
    assert estimate.total_gb == pytest.approx(estimate.total_bytes / GIB)
    assert estimate.total_bytes == estimate.static_bytes + estimate.phase_bytes(estimate.peak_phase)
    assert estimate.peak_phase == max(estimate.phases, key=estimate.phase_bytes)
    assert all(value >= 0 for value in estimate.parts.values())
    # What torch allocates: every part but the CUDA context.
    assert estimate.allocated_bytes == sum(v for k, v in estimate.parts.items() if not k.startswith("CUDA context"))


def test_qwen25_7b_weights_match_the_known_4bit_size():
    """Expectation, by hand: Qwen2.5-7B has 7.62B parameters; 1.09B of them are the embedding
    and the (untied) LM head (2 x 152064 x 3584), kept in bf16: 2.18e9 bytes. The other 6.53B
    are the decoder layers' linear weights in NF4 with double quantisation: 4 bits + ~0.127 bit
    of scales each, 3.37e9 bytes. Together ~5.55e9 bytes = 5.17 GiB, which is the size of the
    published 4-bit checkpoints (e.g. unsloth/Qwen2.5-7B-Instruct-bnb-4bit, ~5.5 GB) and inside
    the commonly quoted 4.5-5.5 GB for a 4-bit 7B model."""
    estimate = estimate_memory(load_arch("qwen2.5-7b"), config())
    counts = estimate.params
    assert counts.embedding + counts.lm_head == pytest.approx(1.09e9, rel=0.01)
    assert counts.linear == pytest.approx(6.53e9, rel=0.01)
    assert estimate.weights_bytes == pytest.approx(5.55e9, rel=0.02)
    gib = estimate.weights_bytes / GIB
    assert 4.5 * 0.9 <= gib <= 5.5 * 1.1
    four_bit = counts.linear * memory.NF4_BYTES_PER_PARAM
    assert four_bit == pytest.approx(3.37e9, rel=0.01)


def test_nf4_bytes_per_param_spelled_out():
    # 4 bits + 8-bit absmax per 64 weights + fp32 absmax per 256 blocks.
    assert memory.NF4_BYTES_PER_PARAM == pytest.approx((4 + 8 / 64 + 32 / 16384) / 8)


def test_lora_parameters_for_all_linear_and_a_subset():
    values = load_arch("qwen2.5-7b")
    lora_all, _ = model_shape.lora_parameters(values, config(lora_r=16))
    # per layer: r * (in + out) summed over q, k, v, o, gate, up, down; 28 layers
    H, I, kv = 3584, 18944, 512
    per_layer = 16 * ((H + H) + 2 * (H + kv) + (H + H) + 2 * (H + I) + (I + H))
    assert lora_all == 28 * per_layer
    lora_qv, notes = model_shape.lora_parameters(values, config(lora_r=16, lora_target_modules=["q_proj", "v_proj"]))
    assert lora_qv == 28 * 16 * ((H + H) + (H + kv)) and not notes


def test_tied_embeddings_are_counted_once():
    tied = count_parameters(load_arch("qwen2.5-1.5b"))
    assert tied.lm_head == 0 and tied.embedding == 151936 * 1536


# Each knob only feeds one phase, and the total is the largest phase: the other knobs are set
# small so that the knob's phase is the peak and the total must grow with it.
@pytest.mark.parametrize("key, phase, values, others", [
    ("generation_chunk_size", "generation", [1, 2, 4, 8, 16], dict(micro_batch_size=1, logprob_chunk_size=16)),
    ("micro_batch_size", "update: layers", [1, 2, 4, 8, 16], dict(logprob_chunk_size=16)),
    ("logprob_chunk_size", "update: LM head", [16, 64, 256, 1024], dict(micro_batch_size=1)),
    ("max_completion_length", None, [128, 256, 512, 1024, 2048], {}),
])
def test_estimate_grows_monotonically(key, phase, values, others):
    arch = load_arch("qwen2.5-7b")
    estimates = [estimate_memory(arch, config(**others, **{key: v})) for v in values]
    totals = [e.total_bytes for e in estimates]
    assert totals == sorted(totals)  # never shrinks
    if phase is None:
        assert all(a < b for a, b in zip(totals, totals[1:]))
    else:  # the phase the knob belongs to grows strictly
        sizes = [e.phase_bytes(phase) for e in estimates]
        assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    assert totals[-1] > totals[0]


def test_gradient_checkpointing_and_8bit_optimizer_save_memory():
    arch = load_arch("llama-3.1-8b")
    base = estimate_memory(arch, config())
    assert estimate_memory(arch, config(gradient_checkpointing=False)).total_bytes > base.total_bytes
    assert estimate_memory(arch, config(optimizer="paged_adamw_8bit")).optimizer_bytes < base.optimizer_bytes / 3
    assert estimate_memory(arch, config(quantization="none")).weights_bytes > 2.5 * base.weights_bytes


# --- the plan -----------------------------------------------------------------------------------


def test_plan_picks_smaller_chunks_for_a_smaller_budget():
    arch = load_arch("qwen2.5-1.5b")
    big, small = plan(config(), 24, model_config=arch), plan(config(), 8, model_config=arch)
    assert big.fits and small.fits
    assert small.generation_chunk_size <= big.generation_chunk_size
    assert small.micro_batch_size <= big.micro_batch_size
    assert (small.generation_chunk_size, small.micro_batch_size, small.logprob_chunk_size) < \
        (big.generation_chunk_size, big.micro_batch_size, big.logprob_chunk_size) or \
        small.estimate.total_bytes < big.estimate.total_bytes
    for p in (big, small):
        assert p.estimate.total_bytes <= p.vram_gb * GIB * (1 - planner.SAFETY_MARGIN)
        assert 16 % p.generation_chunk_size == 0 and 16 % p.micro_batch_size == 0  # divisors of P * G


def test_plan_chooses_the_largest_settings_that_fit():
    arch = load_arch("qwen2.5-7b")
    chosen = plan(config(), 16, model_config=arch)
    budget = 16 * GIB * (1 - planner.SAFETY_MARGIN)
    # One step up in either knob would not fit (or there is no step up).
    if chosen.generation_chunk_size < 16:
        bigger = [d for d in range(chosen.generation_chunk_size + 1, 17) if 16 % d == 0][0]
        assert estimate_memory(arch, config(), generation_chunk_size=bigger, micro_batch_size=1,
                               logprob_chunk_size=16).total_bytes > budget
    if chosen.micro_batch_size < 16:
        bigger = [d for d in range(chosen.micro_batch_size + 1, 17) if 16 % d == 0][0]
        assert estimate_memory(arch, config(), generation_chunk_size=1, micro_batch_size=bigger,
                               logprob_chunk_size=64).total_bytes > budget


def test_plan_reports_does_not_fit_for_an_absurd_budget():
    result = plan(config(), 1, model_config=load_arch("llama-3.1-8b"))
    assert not result.fits
    assert result.advice and "smaller model" in result.advice[0]
    text = format_plan(result)
    assert "does NOT fit" in text and "of 1 GB" in text


def test_plan_advises_a_shorter_completion_when_only_the_length_is_too_much():
    result = plan(config(max_completion_length=32768), 8, model_config=load_arch("qwen2.5-7b"))
    assert not result.fits
    assert any("max_completion_length" in line for line in result.advice)


def test_plan_overrides_load_as_the_config_the_plan_estimated():
    arch = load_arch("qwen2.5-3b")
    result = plan(config(), 12, model_config=arch)
    own = {key: getattr(config(), key) for key in result.overrides}
    assert result.fits and result.overrides != own  # 12 GB takes larger chunks than config()'s
    planned = load_config(overrides={**config().to_dict(), **result.overrides})
    assert {key: getattr(planned, key) for key in result.overrides} == result.overrides
    assert result.chunking.as_dict().items() <= result.overrides.items()  # the chunk sizes among them
    # The loaded config, estimated with its own chunk sizes, is what the plan chose: it fits.
    assert estimate_memory(arch, planned).total_bytes == result.estimate.total_bytes <= result.usable_gb * GIB


def test_format_plan_shows_every_part_and_the_verdict():
    result = plan(config(), 16, model_config=load_arch("qwen2.5-7b"))
    text = format_plan(result)
    for label in result.estimate.parts:
        assert label in text
    assert "needs ~" in text and "of 16 GB" in text and "fits" in text
    assert f"generation_chunk_size={result.generation_chunk_size}" in text


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_plan_tiny_preset_fits(tiny_cache, capsys):
    from lowvram_grpo.cli import main

    assert main(["plan", "--preset", "tiny-cpu", "--vram-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "4-bit NF4 linear weights" in out and "LoRA weights" in out and "total" in out
    assert "needs ~" in out and "fits" in out and "chosen:" in out
    assert "lowvram-grpo train --preset tiny-cpu" in out


def test_cli_plan_8b_in_1gb_exits_1_with_a_message(tiny_cache, capsys):
    from lowvram_grpo.cli import main

    code = main(["plan", "--vram-gb", "1", "model=meta-llama/Llama-3.1-8B-Instruct"])
    captured = capsys.readouterr()
    assert code == 1
    assert "does NOT fit" in captured.out
    assert "does not fit in 1 GB" in captured.err and "smaller model" in captured.err


def test_cli_plan_bad_vram_is_a_usage_error(capsys):
    from lowvram_grpo.cli import EXIT_USAGE, main

    assert main(["plan", "--vram-gb", "0", "model=qwen2.5-0.5b"]) == EXIT_USAGE
    assert "--vram-gb" in capsys.readouterr().err


def test_cli_plan_as_a_subprocess(tiny_cache):
    """The installed entry point path: `python -m lowvram_grpo.cli plan ...` exits 0."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lowvram_grpo.cli", "plan", "--preset", "tiny-cpu",
                             "--vram-gb", "16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout and "needs ~" in result.stdout


# --- architectures beyond the dense transformer ---------------------------------------------------


def _kv_parts(estimate) -> int:
    return sum(v for k, v in estimate.phases["generation"].items() if "KV cache" in k and "growth" not in k)


def test_sliding_window_layers_cache_only_their_window():
    gemma = load_arch("gemma-3-4b")  # 5 of every 6 layers slide over 1024 tokens
    long = config(max_prompt_length=256, max_completion_length=3840)  # 4096 tokens
    windowed = _kv_parts(estimate_memory(gemma, long))
    everywhere = _kv_parts(estimate_memory({**gemma, "sliding_window_pattern": None, "sliding_window": None}, long))
    layers = gemma["num_hidden_layers"]
    full_layers = layers // 6
    kv_token = 2 * gemma["num_key_value_heads"] * gemma["head_dim"] * 2 * 8  # bytes, bf16, 8 sequences
    assert everywhere == layers * 4096 * kv_token
    assert windowed == full_layers * 4096 * kv_token + (layers - full_layers) * 1024 * kv_token


def test_convolution_layers_hold_a_small_state_instead_of_a_kv_cache():
    lfm2 = load_arch("lfm2-1.2b")  # 6 attention layers, 10 short-convolution layers
    generation = estimate_memory(lfm2, config()).phases["generation"]
    kv = next(v for k, v in generation.items() if k.startswith("KV cache"))
    assert "x 6 layers" in next(k for k in generation if k.startswith("KV cache"))
    conv = next(v for k, v in generation.items() if k.startswith("convolution state"))
    assert conv == 8 * 10 * lfm2["hidden_size"] * lfm2["conv_L_cache"] * 2
    assert conv < kv / 100


def test_moe_experts_stay_16_bit_and_a_30b_moe_does_not_fit_24_gb():
    moe = load_arch("qwen3-30b-a3b")
    counts = count_parameters(moe)
    assert counts.experts == 48 * 128 * 3 * 2048 * 768  # every layer's 128 experts
    estimate = estimate_memory(moe, config())
    assert estimate.parts[next(k for k in estimate.parts if "MoE experts" in k)] == counts.experts * 2
    assert any("experts stay 16-bit" in note for note in estimate.notes)
    result = plan(config(), 24, model_config=moe)
    assert not result.fits and "smaller model" in result.advice[0]


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "granitemoehybrid", "gpt_oss", "gemma4_text"])
def test_architectures_the_planner_cannot_model_are_refused_with_the_reason(model_type):
    from transformers import CONFIG_MAPPING

    values = CONFIG_MAPPING[model_type]().to_dict()
    with pytest.raises(PlannerError, match=f"cannot model {model_type} .*set the chunk sizes by hand"):
        estimate_memory(values, config())


def test_a_hub_id_in_the_local_cache_uses_the_checkpoints_own_config(tmp_path, monkeypatch):
    """The cached config.json beats the shipped file; offline and uncached, the error says so."""
    from transformers import AutoConfig

    real = load_arch("qwen3-8b")
    snapshot = tmp_path / "models--Qwen--Qwen3-8B" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({**real, "num_hidden_layers": 30}))
    (tmp_path / "models--Qwen--Qwen3-8B" / "refs").mkdir()
    (tmp_path / "models--Qwen--Qwen3-8B" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_config("Qwen/Qwen3-8B")["num_hidden_layers"] == 30

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    assert resolve_model_config("Qwen/Qwen3-8B") == real  # uncached: the shipped file

    def offline(cls, name, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(offline))
    with pytest.raises(PlannerError, match="not in the local Hugging Face cache .*offline"):
        resolve_model_config("someone/SomeModel-3B")


def test_with_tools_later_turns_prefill_the_trajectory_tool_results_included():
    """Issue 23: each later turn of a multi-turn rollout prefills the prompt and the trajectory so
    far (tool results included), not the prompt alone; the KV cache already spans the whole
    trajectory (max_completion_length counts tool results too)."""
    model = resolve_model_config("qwen3-4b")
    plain = estimate_memory(model, config())
    tools = estimate_memory(model, config(tools=["python"]))
    def prefill(est):
        return next(v for k, v in est.phases["generation"].items() if k.startswith("prefill"))
    assert prefill(tools) == prefill(plain) * (256 + 1024) // 256
    assert any("tool results" in k for k in tools.phases["generation"])
    def kv(est):
        return next(v for k, v in est.phases["generation"].items() if k.startswith("KV cache"))
    assert kv(tools) == kv(plain)  # both already 256 + 1024 tokens per sequence
    assert tools.total_bytes >= plain.total_bytes


# --- long sequences: offloaded activations and sequence-chunked layers (issue 25) -----------------


def _long(arch: str, completion: int, **overrides) -> TrainConfig:
    preset = {"qwen3-8b": "qwen3-8b-gsm8k", "llama-3.1-8b": "llama3.1-8b-gsm8k"}[arch]
    from lowvram_grpo.config import load_config

    return load_config(preset=preset, overrides={"max_completion_length": completion, **overrides})


def test_offloading_moves_the_checkpointed_inputs_to_cpu_memory_and_chunking_bounds_the_layer():
    arch, c = load_arch("qwen3-8b"), _long("qwen3-8b", 32768)
    one = dict(generation_chunk_size=1, micro_batch_size=1, logprob_chunk_size=16)
    plain = estimate_memory(arch, c, **one, offload_activations=False, sequence_chunk_size=None)
    offloaded = estimate_memory(arch, c, **one, offload_activations=True, sequence_chunk_size=None)
    both = estimate_memory(arch, c, **one, offload_activations=True, sequence_chunk_size=2048)
    tokens, H, L = 256 + 32768, 4096, 36
    inputs = tokens * H * 2 * L  # 295 KB per token in bf16, ~9.7 GB
    assert offloaded.host_bytes - plain.host_bytes == inputs
    assert plain.phase_bytes("update: layers") - offloaded.phase_bytes("update: layers") == inputs - 2 * tokens * H * 2
    # The chunked layer keeps ~a quarter of what the whole layer does at this length.
    assert both.phase_bytes("update: layers") < 0.6 * offloaded.phase_bytes("update: layers")
    assert both.total_gb < 16 * 0.9 < offloaded.total_gb


def test_plan_turns_offloading_and_chunking_on_only_when_the_run_does_not_fit_without():
    arch = load_arch("qwen3-8b")
    short = plan(_long("qwen3-8b", 1024), 16, model_config=arch, ram_gb=64)
    assert short.fits and not short.offload_activations and short.sequence_chunk_size is None
    long = plan(_long("qwen3-8b", 32768), 16, model_config=arch, ram_gb=64)
    assert long.fits and long.offload_activations and long.sequence_chunk_size
    assert long.overrides["offload_activations"] is True
    TrainConfig(**{**_long("qwen3-8b", 32768).to_dict(), **long.overrides})  # valid config values
    assert long.longest_completion >= 32768
    text = format_plan(long)
    assert "offloaded layer inputs" in text and "CPU memory" in text and f"{long.longest_completion:,}" in text
    fixed = plan(_long("qwen3-8b", 32768, offload_activations=False, sequence_chunk_size=None), 16, model_config=arch)
    assert not fixed.fits and any("offload_activations=auto" in line for line in fixed.advice)


def test_plan_refuses_a_run_whose_offloaded_activations_exceed_the_ram_with_the_number():
    arch = load_arch("qwen3-8b")
    # 32K tokens fit 16 GB only with offloading: ~10 GB of layer inputs (+ the process) a 12 GB machine lacks.
    result = plan(_long("qwen3-8b", 32768), 16, model_config=arch, ram_gb=12)
    assert not result.fits and result.offload_activations
    needed = estimate_memory(arch, _long("qwen3-8b", 32768), generation_chunk_size=1, micro_batch_size=1,
                             logprob_chunk_size=16, offload_activations=True,
                             sequence_chunk_size=result.sequence_chunk_size).host_bytes / GIB
    assert any(f"~{needed:.1f} GB of CPU memory" in line and "10.8 GB is usable" in line for line in result.advice)


def test_the_issue_goals_for_qwen3_8b_are_met_by_the_planner():
    arch, c = load_arch("qwen3-8b"), _long("qwen3-8b", 1024)
    for vram_gb, goal in ((16, 32 * 1024), (24, 64 * 1024), (80, 256 * 1024)):
        assert planner.longest_completion(c, vram_gb, arch, ram_gb=2048) >= goal
        assert planner.longest_completion(c, vram_gb, arch, ram_gb=2048, candidates=[(False, None)]) < goal


def test_generation_memory_is_reported_per_token_of_length():
    arch = load_arch("qwen3-8b")
    estimate = estimate_memory(arch, _long("qwen3-8b", 32768), generation_chunk_size=1)
    assert estimate.kv_bytes_per_token == 2 * 8 * 128 * 2 * 36  # K and V, 8 heads x 128, bf16, 36 layers
    kv = next(v for k, v in estimate.phases["generation"].items() if k.startswith("KV cache ("))
    assert kv == (256 + 32768) * estimate.kv_bytes_per_token


# The three models of the issue's table, scaled down with their proportions: q width = hidden,
# k/v width = hidden / 4 (Qwen3-8B, Llama-3.1-8B) or / 6 (Qwen2.5-1.5B), their MLP widths.
SCALED_DOWN = {
    "qwen3-8b": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=1),
    "llama-3.1-8b": dict(hidden_size=256, intermediate_size=896, num_attention_heads=4, num_key_value_heads=1),
    "qwen2.5-1.5b": dict(hidden_size=192, intermediate_size=1120, num_attention_heads=3, num_key_value_heads=1),
}


@pytest.mark.parametrize("arch", sorted(SCALED_DOWN))
def test_update_bytes_per_token_agree_with_live_tensors_within_5_percent(arch, tmp_path):
    """The planner's per-token update terms with offloading and chunked layers, against the bytes
    a real update keeps alive (bench.update_bytes: device-resident and offloaded apart), on the
    architecture scaled down (2 layers, head_dim 64), in fp32 on the CPU. Per token: two lengths,
    so that what does not grow with the length cancels."""
    from bench.update_bytes import build_model, measure_updates

    values = {**load_arch(arch), "num_hidden_layers": 2, "head_dim": 64, "vocab_size": 512, **SCALED_DOWN[arch]}
    model = build_model(values, tmp_path / "model")
    config = TrainConfig(model_name_or_path=str(model), quantization="none", dtype="float32", lora_dropout=0.0,
                         micro_batch_size=1, prompts_per_step=1, num_generations=2, max_prompt_length=32,
                         logprob_chunk_size=64, offload_activations=True, sequence_chunk_size=64)
    lengths = (224, 480)
    measured = measure_updates(config, 32, list(lengths))
    estimates = [estimate_memory(values, dataclasses.replace(config, max_completion_length=n)) for n in lengths]

    def per_token(values: list[int]) -> float:
        return (values[1] - values[0]) / (lengths[1] - lengths[0])

    update = [max(e.phase_bytes(p) for p in e.phases if p.startswith("update")) for e in estimates]
    device = per_token([m.device_peak for m in measured])
    assert per_token(update) == pytest.approx(device, rel=0.05)
    host = per_token([m.host_peak for m in measured])
    assert host == 2 * values["hidden_size"] * 4  # every layer's input, fp32
    assert per_token([e.host_bytes for e in estimates]) == pytest.approx(host, rel=0.05)


def test_a_run_resolves_auto_long_context_settings_from_the_plan_on_a_gpu_and_off_on_the_cpu(capsys):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # vram_gb is set: no GPU is asked
    long = _long("qwen3-8b", 32768, vram_gb=16, ram_gb=64, model_name_or_path="qwen3-8b")
    assert planner.resolve_long_context(long, cuda) == (True, 4096)
    assert "offload_activations=True, sequence_chunk_size=4096" in capsys.readouterr().out
    short = _long("qwen3-8b", 1024, vram_gb=16, ram_gb=64, model_name_or_path="qwen3-8b")
    assert planner.resolve_long_context(short, cuda) == (False, None)
    assert planner.resolve_long_context(long, cpu) == (False, None)  # offloading saves nothing on the CPU
    fixed = _long("qwen3-8b", 1024, offload_activations=True, sequence_chunk_size=512)
    assert planner.resolve_long_context(fixed, cpu) == (True, 512)
