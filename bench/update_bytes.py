"""The bytes one micro-batch's update keeps alive, device-resident and offloaded apart, on the CPU.

`measure_updates(config, prompt, completions)` runs the trainer's own update
(`update._accumulate_gradients`: log-probs with gradients, the GRPO loss, backward) on one
sequence of `prompt + completion` tokens under `bench.live_bytes.LiveTensorBytes`, with the run's
offloading and sequence chunking switched on as training does, and returns the peak bytes the
update added on the "device" and the peak the offloader held in CPU memory. The planner's
per-token terms are checked against the difference of two lengths (tests/test_memory.py), where
everything that does not grow with the length cancels. bench.long_context_step reuses its loading.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from bench.live_bytes import LiveTensorBytes


@dataclasses.dataclass
class UpdateBytes:
    device_peak: int  # the peak of device-resident bytes the update added to what was there before
    host_peak: int  # the most the offloader held in CPU memory


def build_model(values: dict, out_dir: Path) -> Path:
    """A random-weight model of config `values` (fp32) and a tokenizer for its vocabulary, once."""
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common import bench_tokenizer

    values = {**values, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**values), dtype=torch.float32)
    model.save_pretrained(out_dir)
    bench_tokenizer(values["vocab_size"]).save_pretrained(out_dir)
    return out_dir


def load_learner(config, device: torch.device | None = None):
    """The policy as training loads it, long-context settings applied, in a trainer Learner."""
    device = device or torch.device("cpu")
    from lowvram_grpo import trainer
    from lowvram_grpo.model import enable_long_context, load_policy
    from lowvram_grpo.planning.chunking import Chunking

    policy, tokenizer = load_policy(config, device)
    policy.train()  # gradient checkpointing acts in training mode only
    enable_long_context(policy, config.offload_activations is True, config.sequence_chunk_size or None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    chunking = Chunking(1, 1, config.logprob_chunk_size)
    return trainer.Learner(config, chunking, policy, tokenizer, optimizer,
                           torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), None, device, [])


def measure_updates(config, prompt: int, completions: list[int]) -> list[UpdateBytes]:
    """Peak bytes of one update on one random sequence of `prompt + c` tokens, for each `c`.

    The policy loads under the same counter: a view of a weight made during the update (a
    transposed matrix) shares the weight's storage and must not count as new memory."""
    from lowvram_grpo.offload import offloader_of
    from lowvram_grpo.rollout import Rollout
    from lowvram_grpo.update import _accumulate_gradients

    host = {"offloader": None}
    tracker = LiveTensorBytes(offloaded=lambda: host["offloader"].host_bytes if host["offloader"] else 0)
    results = []
    with tracker:
        learner = load_learner(config)
        offloader = host["offloader"] = offloader_of(learner.policy)
        vocab = learner.policy.config.vocab_size
        for completion in completions:
            generator = torch.Generator().manual_seed(completion)
            rollout = Rollout(prompt_ids=torch.randint(3, vocab, (1, prompt), generator=generator),
                              prompt_mask=torch.ones(1, prompt, dtype=torch.long),
                              completion_ids=torch.randint(3, vocab, (1, completion), generator=generator),
                              completion_mask=torch.ones(1, completion, dtype=torch.long), completions=[""],
                              is_clipped=torch.tensor([True]), num_prompts_truncated=0)
            ref_logps = torch.zeros(1, completion) if config.beta > 0 else None

            def update(rollout=rollout, ref_logps=ref_logps, completion=completion) -> None:
                _accumulate_gradients(learner, rollout, torch.ones(1), ref_logps, None, 1, float(completion),
                                      learner.chunking)

            if not results:
                update()  # a first update makes what every later one finds made (caches, LoRA gradients)
            # The update frees the LoRA gradients first and makes them anew: every length counts
            # them alike, so they cancel in a difference of lengths.
            before = tracker.current
            tracker.reset_peaks()
            if offloader:
                offloader.reset_peak()
            update()
            results.append(UpdateBytes(device_peak=tracker.device_peak - before,
                                       host_peak=offloader.peak_host_bytes if offloader else 0))
    return results
