"""The app's "try it": one adapter's model, loaded into the app's process on demand (cached),
generating greedily with the adapter off (the base model) and on, for side-by-side comparison."""

from __future__ import annotations

import threading
from pathlib import Path

from lowvram_grpo.rundir import RunDir


class AdapterPlayground:
    def __init__(self):
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._loaded: tuple | None = None  # (policy, tokenizer, config)

    def generate(self, run_dir: Path, adapter: Path, prompt: str, max_new_tokens: int) -> tuple[str, str]:
        from lowvram_grpo.model import reference_model
        from lowvram_grpo.prompts import with_system_prompt
        from lowvram_grpo.rollout import generate_greedy

        with self._lock:
            policy, tokenizer, config = self._load(run_dir, adapter)
            messages = with_system_prompt(prompt, config.system_prompt)  # as the run's training prompts

            def run() -> str:
                return generate_greedy(policy, tokenizer, [messages], chunk_size=1, max_new_tokens=max_new_tokens,
                                       max_prompt_length=config.max_prompt_length).completions[0]

            with reference_model(policy):
                base = run()
            return base, run()

    def _load(self, run_dir: Path, adapter: Path):
        import torch

        from lowvram_grpo.model import load_policy

        weights = adapter / "adapter_model.safetensors"
        key = (str(adapter), weights.stat().st_mtime if weights.exists() else 0)
        if key != self._key:
            self._loaded = self._key = None  # free the previous model before loading the next
            config = RunDir(run_dir).read_config({"adapter_path": str(adapter), "gradient_checkpointing": False})
            if config.cpu_threads and not torch.cuda.is_available():
                torch.set_num_threads(config.cpu_threads)
            policy, tokenizer = load_policy(config)
            policy.eval()
            self._loaded, self._key = (policy, tokenizer, config), key
        return self._loaded
