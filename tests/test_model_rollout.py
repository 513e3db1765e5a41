"""The policy (4-bit base + LoRA, reference = adapter off) and chunked group generation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowvram_grpo import logprobs
from lowvram_grpo.config import load_config
from lowvram_grpo.model import load_policy, reference_model
from lowvram_grpo.quantization import nf4_config, set_cpu_inference_packing
from lowvram_grpo.rollout import Rollout, completion_mask_from_eos, concat_rollouts, generate_rollouts, left_pad

PROMPTS = ["3+5=", "12+7=", "9+9=", "1+1+1+1="]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def policy_and_tokenizer(tiny_cache):
    torch.manual_seed(0)
    policy, tokenizer = load_policy(load_config(preset="tiny-cpu"), torch.device("cpu"))
    # A freshly initialised LoRA is a no-op (B = 0); make it change the outputs.
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy, tokenizer


def _batch(tokenizer, completions=("8", "19", "18", "4")):
    sequences = [tokenizer(p)["input_ids"] + tokenizer(c)["input_ids"] for p, c in zip(PROMPTS, completions)]
    # Right-align by left padding: every sequence ends with its 2-token completion slot.
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    return ids, mask


def test_base_is_4bit_with_lora_on_top(policy_and_tokenizer):
    import bitsandbytes as bnb

    policy, _ = policy_and_tokenizer
    quantised = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # q,k,v,o,gate,up,down in each of the 2 layers
    assert quantised[0].weight.quant_type == "nf4"
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert policy.get_base_model().is_activation_checkpointing


def test_reference_logprobs_equal_the_plain_base_model(policy_and_tokenizer, tiny_path):
    policy, tokenizer = policy_and_tokenizer
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        with reference_model(policy):
            reference, _ = logprobs.sequence_logprobs(policy, ids, mask, 2)
        with_adapter, _ = logprobs.sequence_logprobs(policy, ids, mask, 2)
        base = AutoModelForCausalLM.from_pretrained(tiny_path, quantization_config=nf4_config(torch.float32),
                                                    dtype=torch.float32)
        set_cpu_inference_packing(base, inference_only=False)  # the float32 path the policy takes
        logits = base(input_ids=ids, attention_mask=mask).logits[:, -3:-1].float()
        plain = torch.log_softmax(logits, -1).gather(-1, ids[:, -2:, None]).squeeze(-1)
    torch.testing.assert_close(reference, plain, atol=1e-5, rtol=0)
    assert (with_adapter - reference).abs().max() > 1e-3, "the adapter should change the log-probs"


def test_only_one_copy_of_the_base_weights_is_loaded(tiny_cache, monkeypatch):
    from transformers import AutoModelForCausalLM as Auto

    loads = []
    original = Auto.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Auto, "from_pretrained", classmethod(counting))
    policy, _ = load_policy(load_config(preset="tiny-cpu"), torch.device("cpu"))
    with reference_model(policy):
        pass
    assert len(loads) == 1
    assert sum(isinstance(m, torch.nn.Module) and type(m).__name__ == "Qwen2ForCausalLM"
               for m in policy.modules()) == 1


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_chunked_generation_equals_unchunked_with_greedy_decoding(policy_and_tokenizer, chunk_size):
    policy, tokenizer = policy_and_tokenizer
    kwargs = dict(num_generations=2, max_prompt_length=16, max_completion_length=4, do_sample=False)
    whole = generate_rollouts(policy, tokenizer, PROMPTS, chunk_size=len(PROMPTS) * 2, **kwargs)
    chunked = generate_rollouts(policy, tokenizer, PROMPTS, chunk_size=chunk_size, **kwargs)
    assert whole.completions == chunked.completions
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    assert torch.equal(whole.completion_mask, chunked.completion_mask)
    # Groups are contiguous: both copies of a prompt got the same greedy completion.
    assert whole.completions[0::2] == whole.completions[1::2]


def test_generation_uses_the_kv_cache_even_with_gradient_checkpointing(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    policy.train()  # as inside the training loop
    seen_lengths = []
    decoder = policy.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        generate_rollouts(policy, tokenizer, ["3+5="], num_generations=2, chunk_size=2,
                          max_prompt_length=16, max_completion_length=4, do_sample=False)
    finally:
        hook.remove()
    # The prompt once, then one new token per step: nothing is recomputed.
    assert seen_lengths[0] == 4 and all(n == 1 for n in seen_lengths[1:]), seen_lengths
    assert policy.training, "generation must restore training mode"


def test_sampling_respects_lengths_and_counts_truncated_prompts(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tokenizer, ["3+5=", "1+2+3+4+5+6="], num_generations=4,
                                chunk_size=3, max_prompt_length=6, max_completion_length=3)
    assert rollout.num_prompts_truncated == 1
    assert rollout.prompt_ids.shape[1] == 6  # kept the last 6 tokens
    assert tokenizer.decode(rollout.prompt_ids[-1]) == "4+5+6="  # the end of the prompt survives
    assert rollout.completion_ids.shape[0] == 8 and rollout.completion_ids.shape[1] <= 3
    lengths = rollout.completion_mask.sum(1)
    assert torch.all((lengths >= 1) & (lengths <= 3))
    for ids, mask, clipped in zip(rollout.completion_ids, rollout.completion_mask, rollout.is_clipped):
        ended_with_eos = ids[mask.bool()][-1] == tokenizer.eos_token_id
        assert bool(clipped) == (not ended_with_eos)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    assert completion_mask_from_eos(ids, [1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def _rollout(prompt_lengths, completion_lengths, clipped, pad=0):
    prompt_ids, prompt_mask = left_pad([[7] * n for n in prompt_lengths], pad)
    width = max(completion_lengths)
    completion_mask = torch.tensor([[1] * n + [0] * (width - n) for n in completion_lengths])
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_mask * 5,
                   completion_mask=completion_mask, completions=[str(n) for n in completion_lengths],
                   is_clipped=torch.tensor(clipped), num_prompts_truncated=1)


def test_rollout_mask_truncated_select_and_concat():
    first = _rollout([2, 3], [4, 1], [True, False])
    # mask_truncated_completions: a cut-off completion keeps its tokens but loses every loss/attention position.
    masked = first.mask_truncated()
    assert masked.completion_mask.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    assert first.completion_mask.sum() == 5, "the original is left as it was"
    second = _rollout([1], [2], [False]).select([0])
    both = concat_rollouts([first.select([1]), second], pad_id=0)
    assert both.completions == ["1", "2"] and both.is_clipped.tolist() == [False, False]
    assert both.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]], "prompts re-padded on the left"
    assert both.completion_mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]], "completions re-padded on the right"
    assert both.num_prompts_truncated == 2


def test_the_tiny_model_is_the_same_whatever_the_callers_thread_count(tiny_path, tmp_path):
    """The offline demo's curve must not depend on how many threads the process that first
    built the tiny model had (its warm-up's sums rounded differently with each count)."""
    from safetensors.torch import load_file

    from lowvram_grpo.builtin.tiny_model import build_tiny_model

    threads = torch.get_num_threads()  # what the session's tiny model was built under
    torch.set_num_threads(threads + 1)
    try:
        rebuilt = build_tiny_model(tmp_path / "tiny")
    finally:
        torch.set_num_threads(threads)
    first, second = load_file(tiny_path / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
