"""`model:<hub id or dir>`: a reward model scores each (prompt, completion).

    rewards: [{name: "model:Skywork/Skywork-Reward-V2-Qwen3-0.6B", weight: 1.0}]

The model is an `AutoModelForSequenceClassification` with one label (its logit is the
reward). Texts are built as TRL's GRPOTrainer builds them for a reward model, so scores match
TRL's: conversational prompts, and plain prompts when the reward model's tokenizer has a chat
template, go through that template as a user turn and an assistant turn; otherwise prompt and
completion are concatenated. Tokenised without adding special tokens, right-padded.

It loads on first use, on the policy's device: in 4-bit NF4 on a GPU (unless
`reward_model_quantization=none`), in the compute dtype otherwise, and never with the model's
own code unless `reward_model_trust_remote_code=true`. It scores `reward_model_batch_size`
sequences per forward pass, sorted by length so batches carry little padding; the planner
(`lowvram-grpo plan`) counts its weights and that batch (`planning.memory.reward_model_memory`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowvram_grpo.config import TrainConfig
from lowvram_grpo.rewards.base import RewardFunctionError, completion_text


class RewardModel:
    """A `model:` reward: TRL's reward signature, the model loaded on first call."""

    def __init__(self, name_or_path: str, config: TrainConfig, context=None):
        self.name_or_path = name_or_path
        self.config = config
        self.context = context  # its policy (once loaded) says which device to use
        self.device = None
        self.__name__ = "model_" + Path(name_or_path.rstrip("/")).name
        self.model = None
        self.tokenizer = None

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        self._load()
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        encoded = [self.tokenizer(t, add_special_tokens=False, truncation=True,
                                  max_length=self._max_length())["input_ids"] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(texts)
        size = self.config.reward_model_batch_size
        with torch.no_grad():
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                padded = self.tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True,
                                            return_tensors="pt")
                logits = self.model(input_ids=padded["input_ids"].to(self.device),
                                    attention_mask=padded["attention_mask"].to(self.device)).logits
                for i, value in zip(batch, logits[:, 0].float().cpu().tolist()):
                    scores[i] = value
        return scores

    def text(self, prompt, completion) -> str:
        """What the reward model reads for one (prompt, completion), as TRL builds it."""
        self._load_tokenizer()
        answer = completion_text(completion)
        if isinstance(prompt, list) or self.tokenizer.chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": answer}], tokenize=False)
        return prompt + answer

    def _max_length(self) -> int:
        # Room for the prompt, the completion and a chat template's markup.
        return self.config.max_prompt_length + self.config.max_completion_length + 128

    def _load_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.name_or_path, trust_remote_code=self.config.reward_model_trust_remote_code)
        except (OSError, ValueError) as err:
            raise self._load_error(err) from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"  # keep the completion's end, which the score is about
        self.tokenizer = tokenizer

    def _load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        from lowvram_grpo.model import compute_dtype, default_device

        self._load_tokenizer()
        policy = getattr(self.context, "policy", None)
        device = self.device = next(policy.parameters()).device if policy is not None else default_device()
        dtype = compute_dtype(self.config, device)
        quantization = None
        if device.type == "cuda" and self.config.reward_model_quantization == "nf4":
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.name_or_path, quantization_config=quantization, dtype=dtype, device_map={"": device},
                trust_remote_code=self.config.reward_model_trust_remote_code)
        except (OSError, ValueError) as err:
            raise self._load_error(err) from None
        if model.config.num_labels != 1:
            raise RewardFunctionError(
                f"reward 'model:{self.name_or_path}' has {model.config.num_labels} labels; a reward model "
                "gives one score per text (num_labels=1). Use a reward model, or wrap a classifier in your "
                "own reward function")
        # Sequence classifiers read the score at the last token that is not padding.
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False)

    def _load_error(self, err: Exception) -> RewardFunctionError:
        message = " ".join(str(err).split())
        if "trust_remote_code" in message:
            return RewardFunctionError(
                f"reward 'model:{self.name_or_path}' needs its own code to load; if you trust it, set "
                "reward_model_trust_remote_code=true")
        return RewardFunctionError(
            f"reward 'model:{self.name_or_path}' could not be loaded ({message[:300]}); give a local directory "
            "with config.json, weights and tokenizer, or a hub id while online")


def reward_model(name_or_path: str, context) -> RewardModel:
    """The `model:<id or dir>` reward for a RewardContext (its config; the policy's device)."""
    if not name_or_path.strip():
        raise RewardFunctionError("reward 'model:' needs a reward model: model:<hub id or local directory>")
    return RewardModel(name_or_path.strip(), context.config or TrainConfig(), context)
