"""The "Use the adapter" tab's models: the one model the app's process holds (`ModelSlot`), and
"try it" (`AdapterTryIt`): one adapter's model, loaded on demand, generating greedily with the adapter off (the base
model) and on, for side-by-side comparison."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from lowvram_grpo.rundir import RunDir


class ModelSlot:
    """The one model the app's process keeps loaded between clicks (try-it, Try rewards'
    sampling). Loading another frees the previous one first, and the eval and merge free it
    before they load their own: on one consumer GPU two models at once may not fit.

    Hold `lock` for as long as the model is used: another click must not free it meanwhile."""

    def __init__(self):
        self.lock = threading.RLock()
        self._key: Hashable | None = None
        self._value: Any = None

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The loaded value for `key`, loading it (after freeing the previous one) when it differs."""
        with self.lock:
            if key != self._key:
                self.clear()
                self._value, self._key = load(), key
            return self._value

    def clear(self) -> None:
        import torch

        with self.lock:
            self._key = self._value = None
            gc.collect()  # the model's tensors go now, not whenever the collector runs
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def load_for_inference(config):
    """The policy for generating in the app's process (base + the config's adapter_path, or a
    fresh LoRA): loaded as training loads it (4-bit when the run is), without gradient
    checkpointing, on the config's CPU threads, in eval mode."""
    from dataclasses import replace

    import torch

    from lowvram_grpo.model import default_device, load_policy

    config = replace(config, gradient_checkpointing=False)
    if config.cpu_threads and default_device().type == "cpu":
        torch.set_num_threads(config.cpu_threads)
    policy, tokenizer = load_policy(config, inference_only=True)
    policy.eval()
    return policy, tokenizer


class AdapterTryIt:
    def __init__(self, models: ModelSlot | None = None):
        self.models = models or ModelSlot()

    def generate(self, run_dir: Path, adapter: Path, prompt: str, max_new_tokens: int,
                 image=None) -> tuple[str, str]:
        """The base model's and the adapter's greedy answers to `prompt`, with `image` (a PIL
        image, for an image-text model) shown before it, shrunk as the run's images were."""
        from lowvram_grpo import vision
        from lowvram_grpo.model import reference_model
        from lowvram_grpo.prompts import with_system_prompt
        from lowvram_grpo.rollout import generate_greedy

        with self.models.lock:
            policy, tokenizer, config = self._load(run_dir, adapter)
            messages = with_system_prompt(prompt, config.system_prompt)  # as the run's training prompts
            if image is not None:
                image = vision.load_image(image, run_dir, config.image_size, config.max_pixels)
                messages = vision.with_images(vision.image_prompt(messages, 1), [image])

            def run() -> str:
                return generate_greedy(policy, tokenizer, [messages], chunk_size=1, max_new_tokens=max_new_tokens,
                                       max_prompt_length=config.max_prompt_length).completions[0]

            with reference_model(policy):
                base = run()
            return base, run()

    def _load(self, run_dir: Path, adapter: Path):
        weights = adapter / "adapter_model.safetensors"

        def load():
            config = RunDir(run_dir).read_config({"adapter_path": str(adapter)})
            return (*load_for_inference(config), config)

        return self.models.get(("adapter", str(adapter), weights.stat().st_mtime if weights.exists() else 0), load)
