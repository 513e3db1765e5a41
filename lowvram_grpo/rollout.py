"""Chunked group generation: G completions per prompt, a memory-sized chunk at a time.

All P*G sequences of a step are never generated at once: the KV cache of one chunk of
`generation_chunk_size` sequences is what bounds generation memory, so that is the knob users
turn when they run out. Completions of one prompt stay contiguous (rows i*G .. i*G+G-1),
which is the layout group normalisation expects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowvram_grpo import vision
from lowvram_grpo.prompts import encode_prompts
from lowvram_grpo.stopping import StepInterrupted, generation_stopper


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the first EOS
    completions: list[str]  # decoded, without special tokens
    is_clipped: torch.Tensor  # (N,) True where max_completion_length cut the completion off
    num_prompts_truncated: int  # prompts shortened on the left to max_prompt_length
    # Multi-turn rollouts with tools (agent/loop.py): (N, C) 1 for tokens the model generated, 0 for
    # the tool results spliced in between its turns (TRL's tool_mask); None for single-turn text.
    tool_mask: torch.Tensor | None = None
    # The trajectory as messages (assistant turns with their tool calls, tool results), what
    # reward functions receive as each completion; None for single-turn text.
    completion_messages: list[list[dict]] | None = None
    tool_counts: list | None = None  # per sequence, its tools.ToolCounts (calls, failures, turns)
    # Per sequence: its prompt's processed images (one object shared by a group's sequences: each
    # prompt's images are processed once), or None for a text prompt; None for a text-only rollout.
    model_inputs: list[vision.ImageInputs | None] | None = None

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.size(0)

    @property
    def loss_mask(self) -> torch.Tensor:
        """(N, C) the tokens the loss, KL, entropy and length metrics count: the model's own.
        Tool results stay in the context (completion_mask, the attention) but were not sampled
        from the policy, so they are no part of its objective."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask * self.tool_mask

    def forward_inputs(self, rows: slice | list[int], prompt_width: int, completion_width: int = 0) -> dict:
        """The extra forward inputs (pixel_values, ...) of these sequences, their prompts
        right-aligned in `prompt_width` columns (see vision.forward_inputs); {} without images."""
        if self.model_inputs is None:
            return {}
        rows = list(range(self.num_sequences))[rows] if isinstance(rows, slice) else rows
        return vision.forward_inputs([self.model_inputs[i] for i in rows],
                                     [int(self.prompt_mask[i].sum()) for i in rows], prompt_width, completion_width)

    def completion_token_lists(self) -> list[list[int]]:
        """Each completion's token ids without padding (what reward functions receive)."""
        return [ids[mask.bool()].tolist() for ids, mask in zip(self.completion_ids, self.completion_mask)]

    def select(self, rows: list[int]) -> Rollout:
        """These sequences only (num_prompts_truncated stays the whole rollout's count)."""
        index = torch.tensor(rows, dtype=torch.long)
        return dataclasses.replace(
            self, prompt_ids=self.prompt_ids[index], prompt_mask=self.prompt_mask[index],
            completion_ids=self.completion_ids[index], completion_mask=self.completion_mask[index],
            completions=[self.completions[i] for i in rows], is_clipped=self.is_clipped[index],
            tool_mask=None if self.tool_mask is None else self.tool_mask[index],
            completion_messages=None if self.completion_messages is None
            else [self.completion_messages[i] for i in rows],
            tool_counts=None if self.tool_counts is None else [self.tool_counts[i] for i in rows],
            model_inputs=None if self.model_inputs is None else [self.model_inputs[i] for i in rows])

    def mask_truncated(self) -> Rollout:
        """A copy whose truncated completions (no EOS before max_completion_length) have an
        all-zero completion mask: no loss and no attention, as TRL's mask_truncated_completions.
        A cut-off completion was never judged on its ending, so its reward says little."""
        keep = (~self.is_clipped).unsqueeze(1).to(self.completion_mask.dtype)
        return dataclasses.replace(self, completion_mask=self.completion_mask * keep)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Several rollouts as one: prompts re-padded on the left, completions on the right."""
    prompt_width = max(p.prompt_ids.size(1) for p in parts)
    completion_width = max(p.completion_ids.size(1) for p in parts)
    multi_turn = parts[0].tool_mask is not None

    def pad(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = width - t.size(1)
        return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        prompt_ids=torch.cat([pad(p.prompt_ids, prompt_width, pad_id, True) for p in parts]),
        prompt_mask=torch.cat([pad(p.prompt_mask, prompt_width, 0, True) for p in parts]),
        completion_ids=torch.cat([pad(p.completion_ids, completion_width, pad_id, False) for p in parts]),
        completion_mask=torch.cat([pad(p.completion_mask, completion_width, 0, False) for p in parts]),
        completions=[c for p in parts for c in p.completions],
        is_clipped=torch.cat([p.is_clipped for p in parts]),
        num_prompts_truncated=sum(p.num_prompts_truncated for p in parts),
        # Padding is 1 in the tool mask, as TRL pads it: the completion mask zeroes it anyway.
        tool_mask=torch.cat([pad(p.tool_mask, completion_width, 1, False) for p in parts]) if multi_turn else None,
        completion_messages=_joined([p.completion_messages for p in parts]),
        tool_counts=_joined([p.tool_counts for p in parts]),
        model_inputs=None if all(p.model_inputs is None for p in parts) else
        [x for p in parts for x in (p.model_inputs or [None] * p.num_sequences)])


def _joined(lists: list[list | None]) -> list | None:
    return None if lists[0] is None else [item for part in lists for item in part]


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int) -> tuple[list[list[int]], int]:
    """Token ids per prompt (see prompts.encode_prompts), keeping the last `max_prompt_length`
    (the end of a prompt, where the question and the generation prompt are, matters most).
    Returns (ids, how many were cut). Prompts with images are never cut (an image's tokens must
    stay whole): the data's length filter has dropped those that are too long."""
    if any(vision.has_images(p) for p in prompts):
        return vision.encode_image_prompts(tokenizer, prompts)[0], 0
    encoded = encode_prompts(tokenizer, prompts)
    truncated = sum(len(ids) > max_prompt_length for ids in encoded)
    return [ids[-max_prompt_length:] for ids in encoded], truncated


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # Position of the first EOS (or the length, if there is none) in each row.
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1),
                            torch.full_like(is_eos[:, 0], completion_ids.size(1), dtype=torch.long))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
    return (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's (chat models often have
    several, e.g. <|im_end|> and <|endoftext|>) plus the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: list, *, num_generations: int,
                      chunk_size: int, max_prompt_length: int, max_completion_length: int,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      do_sample: bool = True, should_stop: Callable[[], bool] | None = None) -> Rollout:
    """Sample `num_generations` completions for each prompt, `chunk_size` sequences at a time.

    A prompt is a plain string, or a conversation that goes through the chat template (which
    already contains the model's special tokens, so none are added on top); a conversation may
    hold images ({"type": "image", "image": <PIL image>} parts, see vision.with_images), which
    the tokenizer's processor turns into image tokens and pixel values, once per prompt. Once
    `should_stop()` is true, generation ends at the next token and StepInterrupted is raised:
    a long generation must not delay a requested stop by minutes."""
    image_inputs = None
    if any(vision.has_images(p) for p in prompts):
        prompt_ids, image_inputs = vision.encode_image_prompts(tokenizer, prompts)
        num_truncated = 0
    else:
        prompt_ids, num_truncated = tokenize_prompts(tokenizer, prompts, max_prompt_length)
    # Repeat each prompt G times, keeping a group's rows together.
    sequences = [ids for ids in prompt_ids for _ in range(num_generations)]
    if image_inputs is not None:  # the vision tower runs here, once per prompt, for the whole step
        vision.encode_images(model, image_inputs)
    model_inputs = None if image_inputs is None else [x for x in image_inputs for _ in range(num_generations)]
    eos_ids = eos_token_ids(model, tokenizer)
    # An image token sampled into a completion would ask the forward pass for image features
    # that are not there.
    suppress = vision.image_token_ids(model.config) if model_inputs is not None else None
    completion_ids = generate_completions(
        model, tokenizer, sequences, chunk_size=chunk_size, max_new_tokens=max_completion_length, eos_ids=eos_ids,
        temperature=temperature, top_p=top_p, top_k=top_k, do_sample=do_sample, should_stop=should_stop,
        model_inputs=model_inputs, suppress_tokens=suppress)
    completion_mask = completion_mask_from_eos(completion_ids, eos_ids)
    has_eos = torch.isin(completion_ids, torch.tensor(eos_ids)).any(dim=1)
    # Tokens after the first EOS are padding, whatever generate() put there.
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    all_prompt_ids, all_prompt_mask = left_pad(sequences, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        prompt_ids=all_prompt_ids, prompt_mask=all_prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, completions=completions, is_clipped=~has_eos,
        num_prompts_truncated=num_truncated, model_inputs=model_inputs)


@torch.no_grad()
def generate_completions(model, tokenizer, sequences: list[list[int]], *, chunk_size: int, max_new_tokens: int,
                         eos_ids: list[int], temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         do_sample: bool = True, should_stop: Callable[[], bool] | None = None,
                         model_inputs: list | None = None, suppress_tokens: list[int] | None = None) -> torch.Tensor:
    """(N, W) new tokens after each of `sequences` (right-padded; what follows the first EOS is
    whatever generate() put there), `chunk_size` sequences per generate() call; `model_inputs`
    holds each sequence's processed images (vision.ImageInputs or None), `suppress_tokens` the
    ids never to sample."""
    device = next(model.parameters()).device
    # Gradient checkpointing is only active in training mode; eval mode also turns LoRA
    # dropout off. Together with use_cache=True this keeps generation linear in length:
    # with the cache off every new token would re-run the whole sequence.
    was_training = model.training
    model.eval()
    chunks = []
    stopping_criteria = [generation_stopper(should_stop)] if should_stop is not None else None
    try:
        for start in range(0, len(sequences), chunk_size):
            if should_stop is not None and should_stop():
                raise StepInterrupted()
            chunk = sequences[start:start + chunk_size]
            ids, mask = left_pad(chunk, tokenizer.pad_token_id)
            extra = {} if model_inputs is None else vision.forward_inputs(
                model_inputs[start:start + chunk_size], [len(s) for s in chunk], ids.size(1))
            output = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                **_to_device(extra, device), suppress_tokens=suppress_tokens,
                max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None, top_k=top_k if do_sample else None,
                use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
                stopping_criteria=stopping_criteria)
            chunks.append(output[:, ids.size(1):].cpu())
        if should_stop is not None and should_stop():
            raise StepInterrupted()  # the last chunk may have been cut short
    finally:
        model.train(was_training)
    width = max(c.size(1) for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.size(1)), value=tokenizer.pad_token_id)
                      for c in chunks])


def _to_device(inputs: dict, device) -> dict:
    """Forward inputs on `device`: tensors moved, pre-encoded image features (already there) kept."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def generate_greedy(model, tokenizer, prompts: list, *, max_new_tokens: int, max_prompt_length: int,
                    chunk_size: int = 8) -> Rollout:
    """One greedy completion per prompt (the most likely answer, deterministic), through the
    same path as training's rollouts: the chat template for conversations, the tokenizer's
    special tokens for plain text, every EOS id of the generation config. Evaluation, the app's
    try-it and the notebook use it; `.completions` holds the texts."""
    return generate_rollouts(model, tokenizer, prompts, num_generations=1, chunk_size=chunk_size,
                             max_prompt_length=max_prompt_length, max_completion_length=max_new_tokens,
                             do_sample=False)
