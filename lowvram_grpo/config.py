"""Typed run configuration: one flat dataclass, YAML presets, `key=value` overrides.

Precedence is defaults < preset or config file < `key=value` overrides. Everything is validated
once, here, so the rest of the engine can trust the values it is given. Every problem becomes a
`ConfigError` whose message names the offending key and says how to fix it.

The keys deliberately match TRL's `GRPOConfig` where the idea is the same (num_generations,
beta, epsilon, loss_type, scale_rewards, ...) so users' habits and blog posts carry over. Each
key's help and group live in its field's metadata (`key(...)`, TRL's `metadata={"help": ...}`):
the one source of the app's form, `lowvram-grpo keys` and the README's key table (config_docs.py).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lowvram_grpo.errors import UserError
from lowvram_grpo.planning.chunking import Chunking

PRESETS_DIR = Path(__file__).parent / "presets"

# Short names users type on the command line (`lr=2e-5`) for the full field names.
ALIASES = {"lr": "learning_rate", "model": "model_name_or_path", "G": "num_generations"}

# The values of loss_type, scale_rewards, importance_sampling_level and
# multi_objective_aggregation (grpo.py implements them).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
AUTO = "auto"
DEFAULT_REWARD_TIMEOUT = 300.0


class ConfigError(UserError, ValueError):
    """A bad preset, config file or override; the message says which key and how to fix it.

    `key` is the offending config key (the app marks that field), taken from the message's
    `key: ...` prefix unless given; "config" for problems of the file as a whole."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        prefix = message.split(":", 1)[0].strip()
        self.key = key or (prefix if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix) else "config")


@dataclass
class RewardSpec:
    """One reward function and its weight in the summed reward.

    `name` is a built-in reward's name (`lowvram-grpo rewards` lists them), `code_tests`,
    `model:<hub id or dir>` (a reward model), `judge:self` or `judge:<URL>` (an LLM judge), a
    file path and function (`my_rewards.py:correctness`) or a dotted import path
    (`my_pkg.rewards.fmt`).
    """

    name: str
    weight: float = 1.0
    # Keyword arguments bound to the function, e.g. {soft_punish_cache: 64} for overlong_penalty.
    args: dict[str, Any] = field(default_factory=dict)


# The groups of keys, in the order the app's form, `lowvram-grpo keys` and the README show them.
MODEL, DATA, REWARDS, GENERATION, TOOLS, OBJECTIVE, OPTIMISATION, LONG_CONTEXT, OUTPUT = (
    "model", "data", "rewards", "generation (rollouts)", "tools and environments", "GRPO objective", "optimisation",
    "long context", "output")
VISION = "vision"  # images in prompts (issue 24)


def key(default: Any, group: str, help: str) -> Any:
    """A TrainConfig field whose metadata holds its group and help: the one description of a key,
    which the app's form, `lowvram-grpo keys` and the README's key table all show. The same as
    `field(default=..., metadata={"help": ..., "group": ...})` (TRL's style); a list or dict
    default is copied for each config, as `default_factory` would."""
    metadata = {"help": help, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every key a run can set. Help and group live in each field's metadata (see `key`)."""

    model_name_or_path: str = key(
        "builtin:tiny", MODEL, "Hub id or local directory; builtin:tiny is a small model the package builds offline.")
    quantization: Literal["nf4", "none"] = key("nf4", MODEL, "nf4 loads the base model in 4 bits (bitsandbytes).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = key(
        "auto", MODEL, "Compute dtype: auto = bf16 on GPUs that support it, fp16 on older ones (T4; the loss is then "
        "scaled), fp32 on CPU.")
    trust_remote_code: bool = key(False, MODEL, "Run the policy model's own code from the Hub (only if you trust it).")
    chat_template_kwargs: dict[str, Any] = key(
        {}, MODEL, "Extra variables for the model's chat template, passed to every apply_chat_template call: e.g. "
        "{enable_thinking: false} makes Qwen3's and SmolLM3's templates skip the <think> block.")
    gradient_checkpointing: bool = key(True, MODEL, "Recompute activations in the backward pass: far less memory.")
    lora_r: int = key(16, MODEL, "LoRA rank.")
    lora_alpha: int = key(32, MODEL, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).")
    lora_dropout: float = key(0.05, MODEL, "Dropout on the LoRA input.")
    lora_target_modules: str | list[str] = key(
        "all-linear", MODEL, "Modules that get LoRA: all-linear or a list of names such as [q_proj, v_proj].")
    lora_modules_to_save: list[str] = key(
        [], MODEL, "Whole modules trained (and saved with the adapter) next to LoRA, e.g. [lm_head]: costs memory "
        "for a real model's vocabulary; the tiny demo uses it so it can sharpen quickly.")
    adapter_path: str | None = key(None, MODEL, "Continue training from an existing PEFT adapter directory.")

    dataset: str = key(
        "builtin:arith", DATA, "Local file or folder, hub dataset id, or builtin:arith (the offline toy task).")
    dataset_config: str | None = key(None, DATA, "The hub dataset's configuration (subset), e.g. main for gsm8k.")
    dataset_split: str = key("train", DATA, "The split to train on.")
    prompt_column: str = key("prompt", DATA, "The column with the prompt (text or a list of chat messages).")
    answer_column: str | None = key(
        "answer", DATA, "The column with the reference answer, passed to reward functions as `answer`; null if none.")
    system_prompt: str | None = key(None, DATA, "A system message put before every prompt.")
    prompt_template: str | None = key(
        None, DATA, "Builds the prompt from the row, e.g. \"{question}\\nThink step by step.\" (placeholders are "
        "dataset columns).")
    eval_fraction: float = key(0.0, DATA, "Hold out this fraction of `dataset` for evaluation.")
    eval_dataset: str | None = key(
        None, DATA, "Held-out prompts from a separate file or hub id; a hub eval_dataset is read from eval_split (it "
        "may be `dataset` itself with another split, e.g. openai/gsm8k's test; dataset_config then applies to it too).")
    eval_split: str = key("test", DATA, "The split of a hub eval_dataset.")
    # Images (an `image` or `images` column): vision tokens, and so memory and time, grow with the pixels.
    image_size: int | None = key(
        None, VISION, "Longest side of an image in pixels; larger images are shrunk, keeping their aspect ratio "
        "(null: as they are).")
    max_pixels: int | None = key(
        None, VISION, "Most pixels (width x height) per image; larger images are shrunk, keeping their aspect "
        "ratio (null: no limit).")

    rewards: list[RewardSpec] = key(
        [RewardSpec("arith_answer")], REWARDS, "Reward functions and their weights: names, or {name, weight, args} "
        "(`lowvram-grpo rewards` lists every kind).")
    reward_timeout: float | Literal["none"] | None = key(
        DEFAULT_REWARD_TIMEOUT, REWARDS, "Seconds one reward function may take for one step's completions; a call that "
        "takes longer (a loop that never ends, a server that never answers) stops the run with an error naming it. "
        "none = no limit.")
    code_tests_column: str = key(
        "tests", REWARDS, "code_tests: the dataset column with each row's tests (MBPP: test_list).")
    code_timeout_s: float = key(
        10.0, REWARDS, "code_tests: each sandboxed program's wall time in seconds (CPU time is the same, rounded up).")
    code_memory_mb: int = key(512, REWARDS, "code_tests: each sandboxed program's memory limit in MB.")
    code_workers: int = key(0, REWARDS, "code_tests: programs run at once (0 = the CPU cores).")
    reward_model_quantization: Literal["nf4", "none"] = key(
        "nf4", REWARDS, "model: rewards are loaded in 4 bits on a GPU (nf4) or in the compute dtype (none).")
    reward_model_batch_size: int = key(
        8, REWARDS, "model: rewards: sequences per forward pass (the planner counts that batch).")
    reward_model_trust_remote_code: bool = key(
        False, REWARDS, "model: rewards: run the reward model's custom code (separate from trust_remote_code, which is "
        "the policy's).")
    judge_template: str | None = key(
        None, REWARDS, "judge: rewards: the judge's prompt, with {prompt}, {completion} and the dataset's columns as "
        "placeholders; null = a 0-10 score for how well the completion answers the prompt.")
    judge_max_tokens: int = key(16, REWARDS, "judge: rewards: the most tokens of the judge's answer.")
    judge_model: str = key("default", REWARDS, "judge:<URL>: the model name sent to the endpoint.")
    judge_api_key_env: str = key(
        "OPENAI_API_KEY", REWARDS, "judge:<URL>: the environment variable that holds the API key (the key itself "
        "never goes in the config).")
    judge_concurrency: int = key(4, REWARDS, "judge:<URL>: requests at once.")
    judge_timeout_s: float = key(60.0, REWARDS, "judge:<URL>: seconds one request may take.")
    judge_retries: int = key(2, REWARDS, "judge:<URL>: retries of a failed request.")

    num_generations: int = key(8, GENERATION, "G: completions per prompt, normalised as one group.")
    generation_chunk_size: int | Literal["auto"] = key(
        8, GENERATION, "Sequences generated at once: a number, or auto = the planner's choice for vram_gb. Halved "
        "on an out-of-memory error, and the work redone.")
    max_prompt_length: int = key(256, GENERATION, "Longer prompts are dropped when the data loads (and counted).")
    max_completion_length: int = key(256, GENERATION, "The most tokens generated per completion.")
    temperature: float = key(1.0, GENERATION, "Sampling temperature (log-probs use the same).")
    top_p: float = key(1.0, GENERATION, "Nucleus sampling: keep the smallest set of tokens with this probability.")
    top_k: int = key(0, GENERATION, "Sample among the k most likely tokens (0 = off).")

    tools: list[str] = key(
        [], TOOLS, "Functions the model may call while it answers: python (the built-in, run in the code sandbox), "
        "path/to/file.py:function or package.module.function; each needs type hints and a Google-style docstring "
        "(TRL's convention).")
    tool_timeout: float = key(
        30.0, TOOLS, "Seconds one tool call may take; a call that takes longer is abandoned and the model gets an "
        "error result (counted in tools/failure_frequency).")
    max_tool_calling_iterations: int | None = key(
        None, TOOLS, "Most rounds of tool calls per completion (null: until the model stops calling tools or "
        "max_completion_length, which counts the whole trajectory, is reached).")
    environment_factory: str | None = key(
        None, TOOLS, "A class (my_env.py:MyEnv) made once per rollout: reset(**row) returns text added to the prompt "
        "(or None), its public methods are the tools, an optional get_reward() is a reward.")
    rollout_func: str | None = key(
        None, TOOLS, "Your own rollout loop (my_loop.py:rollout), TRL's signature: rollout_func(prompts, trainer) -> "
        "{prompt_ids, completion_ids, logprobs, env_mask?, ...extra fields for the rewards}.")

    loss_type: Literal[LOSS_TYPES] = key(
        "dapo", OBJECTIVE, "The per-token term and how tokens are averaged, as TRL's (README: \"Choosing the "
        "objective\").")
    beta: float = key(
        0.04, OBJECTIVE, "KL weight; the reference is free here (the adapter off), so it is on by default.")
    use_bias_correction_kl: bool = key(True, OBJECTIVE, "KL term times the ratio (an unbiased gradient), as TRL.")
    epsilon: float = key(0.2, OBJECTIVE, "Lower clip: ratio >= 1 - epsilon.")
    epsilon_high: float | None = key(
        None, OBJECTIVE, "Upper clip; null = epsilon (DAPO suggests 0.28). For cispo: the cap on the ratio "
        "(ScaleRL: 5.0).")
    delta: float | None = key(
        None, OBJECTIVE, "Two-sided clipping (INTELLECT-2): also cap the ratio of negative-advantage tokens at delta "
        "(> 1 + epsilon_high).")
    importance_sampling_level: Literal[IMPORTANCE_SAMPLING_LEVELS] = key(
        "token", OBJECTIVE, "sequence = GSPO: one ratio per completion, steadier for sequence-level rewards.")
    sapo_temperature_pos: float = key(1.0, OBJECTIVE, "sapo's gate temperature for positive advantages.")
    sapo_temperature_neg: float = key(1.05, OBJECTIVE, "sapo's gate temperature for the other advantages.")
    vespo_k_pos: float = key(
        2.0, OBJECTIVE, "vespo's weight shape phi(w) = e^lambda w^k e^(-lambda w): k for A >= 0.")
    vespo_lambda_pos: float = key(3.0, OBJECTIVE, "vespo: lambda for A >= 0.")
    vespo_k_neg: float = key(3.0, OBJECTIVE, "vespo: k for A < 0.")
    vespo_lambda_neg: float = key(2.0, OBJECTIVE, "vespo: lambda for A < 0.")
    mask_truncated_completions: bool = key(
        False, OBJECTIVE, "No loss for completions cut off by max_completion_length (DAPO).")
    top_entropy_quantile: float = key(
        1.0, OBJECTIVE, "Train only on the top quantile of tokens by entropy (0.2 suggested; 1 = every token).")
    entropy_coef: float = key(
        0.0, OBJECTIVE, "Entropy bonus: the loss minus entropy_coef times the mean token entropy; with "
        "use_adaptive_entropy, the starting value.")
    use_adaptive_entropy: bool = key(
        False, OBJECTIVE, "Adaptive entropy control (Skywork-OR1): after each update, move entropy_coef by "
        "entropy_coef_delta towards keeping the mean token entropy above entropy_target.")
    entropy_coef_min: float = key(0.0, OBJECTIVE, "use_adaptive_entropy: the lowest coefficient.")
    entropy_coef_max: float = key(1.0, OBJECTIVE, "use_adaptive_entropy: the highest coefficient.")
    entropy_coef_delta: float = key(0.005, OBJECTIVE, "use_adaptive_entropy: the coefficient's step per update.")
    entropy_target: float = key(
        0.2, OBJECTIVE, "use_adaptive_entropy: the mean token entropy (nats) to stay above; set it near the entropy "
        "logged in the first steps.")
    off_policy_mask_threshold: float | None = key(
        None, OBJECTIVE, "Drop negative-advantage completions the policy has drifted away from by more than this "
        "(DeepSeek-V3.2); null = off.")
    scale_rewards: Literal[SCALE_REWARDS] = key(
        "group", OBJECTIVE, "Divide advantages by the reward std of the group, of the batch, or none (Dr. GRPO).")
    multi_objective_aggregation: Literal[MULTI_OBJECTIVE_AGGREGATIONS] = key(
        "sum_then_normalize", OBJECTIVE, "How several reward functions combine: sum then normalise per group, or "
        "(GDPO) normalise each function per group, sum, then normalise over the batch (scale_rewards is then unused).")
    num_iterations: int = key(1, OBJECTIVE, "Policy updates per batch of rollouts (> 1 needs old log-probs).")
    zero_std_groups: Literal["keep", "skip", "resample"] = key(
        "keep", OBJECTIVE, "Groups whose rewards are all equal (advantage 0): keep = train on them (TRL); skip = "
        "leave them out of the log-prob and backward passes; resample = generate for fresh prompts (DAPO's "
        "dynamic sampling).")
    max_resample_rounds: int = key(
        3, OBJECTIVE, "zero_std_groups: resample: the most extra rounds of generation per step.")

    max_steps: int = key(100, OPTIMISATION, "Optimizer steps.")
    prompts_per_step: int = key(4, OPTIMISATION, "Prompts per optimizer step; each brings G completions.")
    micro_batch_size: int | Literal["auto"] = key(
        4, OPTIMISATION, "Sequences per forward/backward: a number, or auto = the planner's choice for vram_gb.")
    logprob_chunk_size: int | Literal["auto"] = key(
        256, OPTIMISATION, "Positions per LM-head chunk: a number, or auto = the planner's choice for vram_gb.")
    vram_gb: float | None = key(
        None, OPTIMISATION, "Memory budget for the auto settings; null = what the GPU has free at the start.")
    # Long sequences (offload.py, sequence_chunks.py).
    offload_activations: bool | Literal["auto"] = key(
        AUTO, LONG_CONTEXT, "Keep each decoder layer's checkpointed input in pinned CPU memory between forward and "
        "backward, copied on a side stream; auto: on only when the planner says the run does not fit the GPU "
        "without it (never on the CPU). Needs gradient_checkpointing.")
    sequence_chunk_size: int | Literal["auto"] | None = key(
        AUTO, LONG_CONTEXT, "Run each layer's per-token modules (norms, attention projections, MLP) over this many "
        "positions at a time, so that one layer's intermediates stay bounded whatever the length; null: never; "
        "auto: the planner's choice (off when the run fits without it, and on the CPU).")
    ram_gb: float | None = key(
        None, LONG_CONTEXT, "CPU memory the planner may fill with offloaded activations; null: this machine's RAM.")
    learning_rate: float = key(1e-5, OPTIMISATION, "Peak learning rate (alias: lr).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = key(
        "cosine", OPTIMISATION, "Learning-rate schedule after the warm-up.")
    warmup_steps: int = key(0, OPTIMISATION, "Steps of linear warm-up.")
    weight_decay: float = key(0.0, OPTIMISATION, "AdamW's weight decay.")
    max_grad_norm: float = key(1.0, OPTIMISATION, "Clip the gradient norm to this.")
    optimizer: Literal["adamw", "paged_adamw_8bit"] = key(
        "adamw", OPTIMISATION, "paged_adamw_8bit (bitsandbytes) saves optimizer memory on a GPU; adamw works "
        "everywhere.")
    seed: int = key(42, OPTIMISATION, "Seed of the prompt order, the sampling and the LoRA initialisation.")
    cpu_threads: int = key(
        0, OPTIMISATION, "CPU threads for torch (0 = torch's default). Tiny models run faster on 1: for their small "
        "matrices, handing work between threads costs more than the work itself.")

    output_dir: str = key("runs/latest", OUTPUT, "The run directory.")
    save_every: int = key(50, OUTPUT, "Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = key(2, OUTPUT, "Older checkpoints are deleted; 0 keeps all.")
    log_completions_every: int = key(10, OUTPUT, "Append sampled completions to completions.jsonl every N steps.")
    num_completions_to_log: int = key(4, OUTPUT, "Completions sampled each time.")
    eval_every: int = key(
        0, OUTPUT, "Evaluate on the eval split every N steps (0 = never); logs eval/* metrics.")
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = key(
        [], OUTPUT, "Also send metrics to these tools when installed: tensorboard, wandb, trackio.")

    def __post_init__(self) -> None:
        self.rewards = [_as_reward_spec(r) for r in self.rewards]
        if self.reward_timeout == "none":
            self.reward_timeout = None
        self.validate()

    @property
    def sequences_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        for key in ("num_generations", "max_prompt_length", "max_completion_length", "max_steps",
                    "prompts_per_step", "num_iterations", "lora_r", "lora_alpha", "save_every",
                    "log_completions_every"):
            need(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}")
        for key in Chunking.keys():
            value = getattr(self, key)
            need(value == AUTO or value >= 1, key, f"must be at least 1 or auto, got {value}")
        need(self.vram_gb is None or self.vram_gb > 0, "vram_gb", f"must be > 0, got {self.vram_gb}")
        need(self.ram_gb is None or self.ram_gb > 0, "ram_gb", f"must be > 0, got {self.ram_gb}")
        need(self.sequence_chunk_size in (None, AUTO) or self.sequence_chunk_size >= 1, "sequence_chunk_size",
             f"must be at least 1 (e.g. 2048), null or auto, got {self.sequence_chunk_size}")
        need(self.offload_activations is not True or self.gradient_checkpointing, "offload_activations",
             "offloads the inputs that gradient checkpointing keeps, so it needs gradient_checkpointing: true "
             "(or set offload_activations: false)")
        for key in ("code_memory_mb", "reward_model_batch_size", "judge_max_tokens", "judge_concurrency"):
            need(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}")
        for key in ("code_timeout_s", "judge_timeout_s"):
            need(getattr(self, key) > 0, key, f"must be more than 0 seconds, got {getattr(self, key)}")
        need(self.code_memory_mb >= 64, "code_memory_mb",
             f"Python itself needs about 30 MB; give at least 64, got {self.code_memory_mb}")
        for key in ("warmup_steps", "keep_checkpoints", "top_k", "num_completions_to_log", "cpu_threads",
                    "eval_every", "code_workers", "judge_retries"):
            need(getattr(self, key) >= 0, key, f"must be 0 or more, got {getattr(self, key)}")
        need(self.num_generations >= 2, "num_generations",
             "GRPO compares completions within a group, so it needs at least 2 (8 is typical)")
        need(self.temperature > 0, "temperature", "must be > 0 (sampling is required for GRPO)")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        need(0 <= self.epsilon < 1, "epsilon", f"must be in [0, 1), got {self.epsilon}")
        need(self.clip_high >= 0, "epsilon_high", f"must be >= 0, got {self.epsilon_high}")
        need(self.loss_type != "cispo" or self.clip_high >= 1, "epsilon_high",
             f"with loss_type=cispo it caps the ratio itself, so it must be >= 1 (ScaleRL uses 5.0), "
             f"got {self.clip_high}")
        need(self.delta is None or self.delta > 1 + self.clip_high, "delta",
             f"caps the ratio above the clip range, so it must be > 1 + epsilon_high = {1 + self.clip_high:g} "
             f"(INTELLECT-2 uses 4), or null to turn it off; got {self.delta}")
        need(0 <= self.top_entropy_quantile <= 1, "top_entropy_quantile",
             f"must be in [0, 1] (1 keeps every token, 0.2 is the paper's choice), got {self.top_entropy_quantile}")
        need(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0 (a bonus), got {self.entropy_coef}")
        need(self.entropy_coef_min >= 0, "entropy_coef_min", f"must be >= 0 (a bonus), got {self.entropy_coef_min}")
        need(self.entropy_coef_max >= self.entropy_coef_min, "entropy_coef_max",
             f"must be >= entropy_coef_min = {self.entropy_coef_min:g}, got {self.entropy_coef_max}")
        need(self.entropy_coef_delta > 0, "entropy_coef_delta",
             f"must be > 0 (the step of the adaptive coefficient, e.g. 0.005), got {self.entropy_coef_delta}")
        need(self.entropy_target >= 0, "entropy_target",
             f"must be >= 0 nats (set it near the entropy logged early in training), got {self.entropy_target}")
        need(not self.use_adaptive_entropy or self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max,
             "entropy_coef", f"with use_adaptive_entropy it is the starting coefficient, so it must be within "
             f"[entropy_coef_min, entropy_coef_max] = [{self.entropy_coef_min:g}, {self.entropy_coef_max:g}], "
             f"got {self.entropy_coef}")
        need(self.off_policy_mask_threshold is None or self.off_policy_mask_threshold > 0,
             "off_policy_mask_threshold", f"must be > 0 (e.g. 0.5) or null, got {self.off_policy_mask_threshold}")
        for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            need(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        need(self.max_resample_rounds >= 1, "max_resample_rounds",
             f"must be at least 1, got {self.max_resample_rounds}")
        need(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        need(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        need(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        need(self.reward_timeout is None or self.reward_timeout > 0, "reward_timeout",
             f"must be a number of seconds > 0, or none for no limit; got {self.reward_timeout}")
        need(bool(self.rewards) or bool(self.environment_factory), "rewards",
             "at least one reward function is needed (or an environment_factory whose class has get_reward)")
        for spec in self.rewards:
            need(bool(spec.name), "rewards", "every reward needs a name")
            name = spec.name if isinstance(spec.name, str) else ""
            if name.startswith("judge:"):
                target = name.removeprefix("judge:")
                need(target == "self" or target.startswith(("http://", "https://")), "rewards",
                     f"'{name}': a judge is judge:self (the policy's own base weights) or judge:<URL of an "
                     "OpenAI-compatible endpoint>, e.g. judge:http://127.0.0.1:8080/v1")
            need(name != "model:", "rewards", "'model:' needs a reward model: model:<hub id or local directory>")
        need(bool(self.judge_api_key_env.strip()), "judge_api_key_env",
             "the name of an environment variable (the key itself never goes in the config)")
        for key in ("image_size", "max_pixels"):
            need(getattr(self, key) is None or getattr(self, key) >= 16, key,
                 f"must be at least 16 pixels, or null to keep the images as they are; got {getattr(self, key)}")
        need(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        need(self.tool_timeout > 0, "tool_timeout", f"must be more than 0 seconds, got {self.tool_timeout}")
        need(self.max_tool_calling_iterations is None or self.max_tool_calling_iterations >= 0,
             "max_tool_calling_iterations", f"must be 0 or more, or null for no limit; got "
             f"{self.max_tool_calling_iterations}")
        for spec in self.tools:
            need(bool(spec.strip()), "tools", "every entry names a function: python, path/to/file.py:function "
                 "or package.module.function")
        need(len(set(self.tools)) == len(self.tools), "tools", f"a tool is listed twice: {self.tools}")
        # Tool-calling trajectories are re-tokenised turn by turn from text (agent/loop.py): they carry
        # no pixel values, so an image prompt would be trained on without its images.
        agent_key = next((k for k in ("tools", "environment_factory", "rollout_func") if getattr(self, k)), None)
        image_key = next((k for k in ("image_size", "max_pixels") if getattr(self, k) is not None), None)
        need(agent_key is None or image_key is None, agent_key,
             f"cannot be combined with {image_key} (images): multi-turn rollouts with tools do not carry images; "
             f"use tools with text prompts, or images without {agent_key}")
        need(bool(self.output_dir), "output_dir", "must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_reward_spec(value: Any) -> RewardSpec:
    if isinstance(value, RewardSpec):
        return value
    if isinstance(value, str):
        return RewardSpec(value)
    if isinstance(value, dict):
        unknown = set(value) - {"name", "weight", "args"}
        if "name" not in value or unknown or not isinstance(value.get("args", {}), dict):
            raise ConfigError(
                f"rewards: each entry is a name or {{name: ..., weight: ..., args: {{...}}}}, got {value!r}")
        return RewardSpec(str(value["name"]), _reward_weight(value["name"], value.get("weight", 1.0)),
                          dict(value.get("args") or {}))
    raise ConfigError(f"rewards: each entry is a name or {{name: ..., weight: ..., args: {{...}}}}, got {value!r}")


def _reward_weight(name: Any, weight: Any) -> float:
    try:
        number = float(weight)  # YAML reads "1e-1" (no dot) as a string: float() takes it
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(weight, bool) or not math.isfinite(number):
        raise ConfigError(f"rewards: the weight of '{name}' must be a number such as 1.0 or 0.5, got {weight!r}")
    return number


# --- loading ---------------------------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(name, list_presets(), n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"preset: no preset named '{name}'.{suggestion} "
            f"Available: {', '.join(list_presets())} (run `lowvram-grpo presets`).")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["lr=2e-5", "num_generations=8"]` -> {"learning_rate": 2e-5, "num_generations": 8}.

    Values are parsed as YAML so numbers, booleans, null and lists (`[q_proj, v_proj]`) work.
    """
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected key=value, for example lr=2e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed[key.strip()] = value
    return parsed


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Check keys and types of a raw mapping and build a validated TrainConfig."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in fields:
            close = difflib.get_close_matches(raw_key, list(fields) + list(ALIASES), n=1)
            suggestion = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{raw_key}: unknown config key.{suggestion}")
        kwargs[key] = value if key == "rewards" else _coerce(key, value, hints[key])
    if "rewards" in kwargs and not isinstance(kwargs["rewards"], list):
        kwargs["rewards"] = [kwargs["rewards"]]
    return TrainConfig(**kwargs)


def load_config(preset: str | None = None, config_path: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """defaults < preset or config file < overrides, validated."""
    if preset and config_path:
        raise ConfigError("config: give either --preset or --config, not both")
    values: dict[str, Any] = {}
    if preset:
        values.update(read_yaml(preset_path(preset)))
    if config_path:
        values.update(read_yaml(config_path))
    if isinstance(overrides, dict):
        values.update(overrides)
    elif overrides:
        values.update(parse_overrides(overrides))
    return build_config(values)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        expected = " or ".join(_describe(o) for o in options if o is not type(None))
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping such as {{enable_thinking: false}}, got {value!r}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    """How a type reads in an error message."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is list:
        return "a list such as [a, b]"
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false"}.get(hint, str(hint))
