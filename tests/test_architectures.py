"""The compatibility matrix: does each popular architecture train correctly with us?

For every architecture in tests/architectures.py (a tiny random model of the real config),
loaded the way training loads it:
- the base is 4-bit NF4 with LoRA on its linear layers, gradient checkpointing on;
- generation uses its cache, and chunked greedy generation equals unchunked;
- our chunked log-probs equal the log-softmax of the model's own full logits (so whatever
  scaling or soft-capping the architecture applies is applied);
- the adapter switched off is exactly the plain base model;
- a GRPO run gives finite losses, changes the LoRA weights, and resuming from a checkpoint
  reproduces the uninterrupted run.

The README's support table is generated from these results:
    UPDATE_SUPPORT_TABLE=1 python -m pytest tests/test_architectures.py
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from architectures import ARCHITECTURES, build_tiny_arch
from conftest import assert_step_two_resumes_exactly
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from lowvram_grpo import logprobs
from lowvram_grpo.config import load_config
from lowvram_grpo.model import load_policy, reference_model
from lowvram_grpo.quantization import nf4_config, set_cpu_inference_packing
from lowvram_grpo.rollout import generate_rollouts, left_pad

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_MARKERS = ("<!-- support-table:start -->", "<!-- support-table:end -->")
PROMPTS = ["3+5=", "12+7=", "9+9=", "1+1+1+1="]  # different lengths: left padding matters
CHECKS = ("4-bit + LoRA", "generation", "log-probs", "reference", "GRPO + resume", "planner")
RESULTS: dict[str, dict[str, str]] = {name: {} for name in ARCHITECTURES}
LOAD_WARNINGS: dict[str, list[str]] = {}  # what load_policy warned about, per architecture
NAMES = sorted(ARCHITECTURES)


def _config(path: Path, **overrides):
    return load_config(overrides={
        "model_name_or_path": str(path), "dtype": "float32", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        **overrides})


@pytest.fixture(scope="module", params=NAMES)
def arch(request, tmp_path_factory):
    """(name, model directory, policy with a random LoRA B so the adapter matters, tokenizer)."""
    name = request.param
    path = build_tiny_arch(name, tmp_path_factory.mktemp(name))
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy, tokenizer = load_policy(_config(path, lora_target_modules=ARCHITECTURES[name].lora_target_modules),
                                        torch.device("cpu"))
    LOAD_WARNINGS[name] = [str(w.message) for w in caught]
    with torch.no_grad():
        for param_name, param in policy.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.05)
    return name, path, policy, tokenizer


def _model_class(name: str):
    """The class that loads the checkpoint whole: image-text models have their own."""
    return AutoModelForImageTextToText if ARCHITECTURES[name].image_text else AutoModelForCausalLM


def _record(name: str, check: str, outcome: str = "ok") -> None:
    RESULTS[name][check] = outcome


def test_base_is_4bit_with_lora_on_every_linear_layer(arch):
    name, _, policy, _ = arch
    base = policy.get_base_model()
    # Every linear of the language model is 4-bit and carries a LoRA adapter; a vision tower
    # stays 16-bit and gets none (the planner counts it so).
    decoder = base.get_decoder()
    vision_parts = [m for n, m in base.named_modules() if any(part in n for part in ("visual", "vision_tower"))]
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in vision_parts), "the vision tower stays 16-bit"
    layers = [m for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n
              and ".base_layer" not in n]
    plain = [m for m in layers if not isinstance(m, bnb.nn.Linear4bit)]
    assert not plain, f"{len(plain)} linear layers were not quantised"
    quantised = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(m.weight.quant_type == "nf4" for m in quantised)
    in_decoder = {n.rsplit(".base_layer", 1)[0] for n, m in decoder.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    lora_owners = {n.rsplit(".lora_A", 1)[0] for n, _ in decoder.named_modules() if n.endswith(".lora_A")}
    assert in_decoder and in_decoder <= lora_owners
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision" in n or "visual" in n for n in trainable), "LoRA belongs on the language model"
    assert base.is_activation_checkpointing
    # Experts stored as 3-D tensors (transformers 5's fused MoE) are not nn.Linear: bitsandbytes
    # leaves them in 16 bits. Record it for the table (and the planner counts them so).
    experts = sum(p.numel() for n, p in base.named_parameters() if p.dim() == 3 and "experts" in n)
    # ...and the user is told when the model loads.
    assert any("mixture-of-experts parameters are not quantised" in w for w in LOAD_WARNINGS[name]) == bool(experts)
    _record(name, "4-bit + LoRA", "ok, experts stay 16-bit" if experts else "ok")


def test_generation_uses_the_cache_and_chunking_changes_nothing(arch):
    name, _, policy, tokenizer = arch
    kwargs = dict(num_generations=2, max_prompt_length=16, max_completion_length=6, do_sample=False)
    whole = generate_rollouts(policy, tokenizer, PROMPTS, chunk_size=8, **kwargs)
    chunked = generate_rollouts(policy, tokenizer, PROMPTS, chunk_size=3, **kwargs)
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    assert whole.completions == chunked.completions

    seen = []
    decoder = policy.get_base_model().get_decoder()
    # A multimodal model embeds the tokens itself and hands its decoder inputs_embeds.
    hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]),
        with_kwargs=True)
    policy.train()  # gradient checkpointing must not switch the cache off during rollouts
    try:
        generate_rollouts(policy, tokenizer, ["3+5="], num_generations=2, chunk_size=2, max_prompt_length=16,
                          max_completion_length=4, do_sample=False)
    finally:
        hook.remove()
        policy.eval()
    # The prompt once, then one new token per step (the random model may stop early).
    assert len(seen) >= 2 and seen[0] == 4 and all(n == 1 for n in seen[1:]), seen
    _record(name, "generation")


def _scored_batch(policy, tokenizer, length: int = 6):
    """Prompts with greedy completions of `length` tokens, left-padded: (ids, mask)."""
    rollout = generate_rollouts(policy, tokenizer, PROMPTS, num_generations=1, chunk_size=4, max_prompt_length=16,
                                max_completion_length=length, do_sample=False)
    completions = torch.nn.functional.pad(rollout.completion_ids, (0, length - rollout.completion_ids.size(1)),
                                          value=tokenizer.pad_token_id)
    sequences = [tokenizer(p)["input_ids"] + c for p, c in zip(PROMPTS, completions.tolist())]
    return left_pad(sequences, tokenizer.pad_token_id)


def _full_logprobs(model, ids, mask, keep: int) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -keep:, None]).squeeze(-1)


def test_chunked_logprobs_equal_the_models_own_logits(arch):
    name, _, policy, tokenizer = arch
    ids, mask = _scored_batch(policy, tokenizer)
    with torch.no_grad():
        ours, _ = logprobs.sequence_logprobs(policy, ids, mask, 6, chunk_size=5)  # chunks across rows
        theirs = _full_logprobs(policy, ids, mask, 6)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    _record(name, "log-probs")


def test_adapter_off_is_the_plain_base_model(arch):
    name, path, policy, tokenizer = arch
    ids, mask = _scored_batch(policy, tokenizer)
    with torch.no_grad():
        with reference_model(policy):
            reference, _ = logprobs.sequence_logprobs(policy, ids, mask, 6)
        adapted, _ = logprobs.sequence_logprobs(policy, ids, mask, 6)
        base = _model_class(name).from_pretrained(path, quantization_config=nf4_config(torch.float32),
                                                    dtype=torch.float32)
        set_cpu_inference_packing(base, inference_only=False)  # the float32 path the policy takes
        plain = _full_logprobs(base, ids, mask, 6)
    torch.testing.assert_close(reference, plain, atol=1e-5, rtol=0)
    assert (adapted - reference).abs().max() > 1e-3, "the adapter should change the log-probs"
    _record(name, "reference")


def test_grpo_trains_and_resumes_exactly(arch, tmp_path):
    from safetensors.torch import load_file

    from lowvram_grpo.trainer import train

    name, path, _, _ = arch
    reward = f"{Path(__file__).with_name('architectures.py')}:distinct_characters"
    config = _config(path, dataset="builtin:arith", rewards=[reward], num_generations=4, prompts_per_step=2,
                     generation_chunk_size=4, micro_batch_size=2, max_prompt_length=16, max_completion_length=6,
                     learning_rate=1e-2, max_steps=2, save_every=1, keep_checkpoints=0, log_completions_every=100,
                     output_dir=str(tmp_path / "run"))
    records = []
    train(config, progress=False, on_step=records.append)
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    run = tmp_path / "run"
    first = load_file(str(run / "checkpoint-000001" / "adapter_model.safetensors"))
    final = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("lora_B" in k and not torch.equal(first[k], final[k]) for k in first), "LoRA weights did not move"
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k), "step 1 did not move LoRA B"

    # Resume from step 1: step 2 again, exactly as the uninterrupted run did it.
    assert_step_two_resumes_exactly(config, run, records, final)
    _record(name, "GRPO + resume")


@pytest.mark.skipif(os.environ.get("UPDATE_SUPPORT_TABLE") == "1", reason="the table is being rewritten")
def test_support_table_in_the_readme_lists_every_architecture():
    text = README.read_text(encoding="utf-8")
    start, end = (text.index(marker) for marker in TABLE_MARKERS)
    table = text[start:end]
    for name, arch in ARCHITECTURES.items():
        assert f"| {name} |" in table and arch.source in table, name


def support_table() -> str:
    """The README table from RESULTS (only complete when the whole matrix ran)."""
    lines = ["| architecture | checked as | " + " | ".join(CHECKS) + " | what it has |",
             "|---" * (len(CHECKS) + 3) + "|"]
    for name in NAMES:
        arch = ARCHITECTURES[name]
        cells = [RESULTS[name].get(check, "**fails**") for check in CHECKS]
        lines.append(f"| {name} | {arch.source} | " + " | ".join(cells) + f" | {arch.features} |")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def write_support_table():
    """After the matrix: with UPDATE_SUPPORT_TABLE=1, write the results into the README."""
    yield
    if os.environ.get("UPDATE_SUPPORT_TABLE") != "1":
        return
    text = README.read_text(encoding="utf-8")
    start, end = (text.index(marker) for marker in TABLE_MARKERS)
    table = support_table()
    README.write_text(text[:start + len(TABLE_MARKERS[0])] + "\n" + table + "\n" + text[end:], encoding="utf-8")


def test_the_planner_counts_what_training_loads_or_refuses(arch):
    """For the architectures the planner models, its parameter and LoRA counts are those of the
    model training loads; the others are refused with a reason, never estimated wrongly."""
    from lowvram_grpo.planning.model_shape import UNMODELLED, PlannerError, count_parameters, lora_parameters

    name, path, policy, _ = arch
    config = json.loads((path / "config.json").read_text())
    train_config = _config(path, lora_target_modules=ARCHITECTURES[name].lora_target_modules)
    try:
        counted = count_parameters(config)
    except PlannerError as err:
        assert ARCHITECTURES[name].model_type in UNMODELLED and "cannot model" in str(err)
        _record(name, "planner", "refused")
        return
    with torch.device("meta"):
        meta = _model_class(name).from_config(AutoConfig.for_model(**config))
    language_model = sum(p.numel() for n, p in meta.named_parameters()
                         if not any(part in n for part in ("vision", "visual", "projector")))
    assert counted.total == language_model
    lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert lora_parameters(config, train_config)[0] == lora
    _record(name, "planner")


def test_lora_dropout_on_moe_experts_is_a_clear_error(tmp_path):
    """peft adapts Qwen3-MoE's expert tensors without dropout: say which key to change."""
    from lowvram_grpo.model import ModelLoadError

    path = build_tiny_arch("qwen3_moe", tmp_path / "qwen3_moe")
    with pytest.raises(ModelLoadError, match=r"^lora_dropout: .*set lora_dropout=0$"):
        load_policy(_config(path, lora_dropout=0.05), torch.device("cpu"))
