"""Typed run configuration: one flat dataclass, YAML presets, `key=value` overrides.

Precedence is defaults < preset or config file < `key=value` overrides. Everything is validated
once, here, so the rest of the engine can trust the values it is given. Every problem becomes a
`ConfigError` whose message names the offending key and says how to fix it.

The keys deliberately match TRL's `GRPOConfig` where the idea is the same (num_generations,
beta, epsilon, loss_type, scale_rewards, ...) so users' habits and blog posts carry over.
"""

from __future__ import annotations

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


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    # Hub id or local directory; "builtin:tiny" is a small model the package builds offline.
    model_name_or_path: str = "builtin:tiny"
    quantization: Literal["nf4", "none"] = "nf4"
    # Compute dtype: auto = bf16 on GPUs that support it, fp16 on older ones (T4; the loss is
    # then scaled, see trainer.build_loss_scaler), fp32 on CPU.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False
    # Extra variables for the model's chat template, passed to every apply_chat_template call:
    # e.g. {enable_thinking: false} makes Qwen3's and SmolLM3's templates skip the <think> block.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # "all-linear" or a list of module names such as [q_proj, v_proj].
    lora_target_modules: Union[str, list[str]] = "all-linear"
    # Whole modules trained (and saved with the adapter) next to LoRA, e.g. [lm_head]: costs
    # memory for a real model's vocabulary; the tiny demo uses it so it can sharpen quickly.
    lora_modules_to_save: list[str] = field(default_factory=list)
    # Continue training from an existing PEFT adapter directory.
    adapter_path: str | None = None

    # --- data --------------------------------------------------------------------------------
    # Local file/folder, hub dataset id, or "builtin:arith" (the offline toy task).
    dataset: str = "builtin:arith"
    dataset_config: str | None = None
    dataset_split: str = "train"
    prompt_column: str = "prompt"
    answer_column: str | None = "answer"
    system_prompt: str | None = None
    # e.g. "{question}\nThink step by step." (placeholders are dataset columns).
    prompt_template: str | None = None
    # Held-out prompts for evaluation: a fraction of `dataset`, or a separate file/id. A hub
    # eval_dataset is read from eval_split (it may be `dataset` itself with another split,
    # e.g. openai/gsm8k's test split; dataset_config then applies to it too).
    eval_fraction: float = 0.0
    eval_dataset: str | None = None
    eval_split: str = "test"

    # --- rewards -----------------------------------------------------------------------------
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("arith_answer")])
    # Seconds one reward function may take for one step's completions; a call that takes longer
    # (a loop that never ends, a server that never answers) stops the run with an error naming
    # it. "none" = no limit.
    reward_timeout: Union[float, Literal["none"], None] = DEFAULT_REWARD_TIMEOUT
    # code_tests: the column of tests, each sandboxed program's wall-time (CPU time is the
    # same, rounded up) and memory limits, and how many run at once (0 = the CPU cores).
    code_tests_column: str = "tests"  # the dataset column with each row's tests (MBPP: test_list)
    code_timeout_s: float = 10.0
    code_memory_mb: int = 512
    code_workers: int = 0
    # model:<hub id or dir> rewards: loaded in 4 bits on a GPU (nf4) or in the compute dtype
    # (none); sequences per forward pass (the planner counts that batch); their custom code
    # runs only if this says so (separate from trust_remote_code, which is the policy's).
    reward_model_quantization: Literal["nf4", "none"] = "nf4"
    reward_model_batch_size: int = 8
    reward_model_trust_remote_code: bool = False
    # judge:self and judge:<url>: the judge's prompt ({prompt}, {completion} and the dataset's
    # columns as placeholders; None = a 0-10 score for how well the completion answers the
    # prompt), the most tokens of its answer, and for endpoints: the model name sent, the
    # environment variable that holds the API key, requests at once, timeout and retries.
    judge_template: str | None = None
    judge_max_tokens: int = 16
    judge_model: str = "default"
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_concurrency: int = 4
    judge_timeout_s: float = 60.0
    judge_retries: int = 2

    # --- generation (rollouts) ---------------------------------------------------------------
    num_generations: int = 8  # G: completions per prompt, normalised as one group
    # Memory-bound chunking: a number, or "auto" to let the planner choose for `vram_gb`.
    # The trainer also halves them on an out-of-memory error and redoes the work.
    generation_chunk_size: Union[int, Literal["auto"]] = 8  # sequences generated at once
    max_prompt_length: int = 256  # longer prompts are dropped when the data loads (and counted)
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    # --- GRPO objective ----------------------------------------------------------------------
    # Names and meanings are TRL 1.16's GRPOConfig's (README: "Choosing the objective").
    loss_type: Literal[LOSS_TYPES] = "dapo"
    beta: float = 0.04  # KL weight; the reference is free here (adapter off), so on by default
    use_bias_correction_kl: bool = True  # KL term times the ratio (unbiased gradient), as TRL
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    # upper clip; None = epsilon (DAPO suggests 0.28). For cispo: the cap on the ratio (ScaleRL: 5.0)
    epsilon_high: float | None = None
    delta: float | None = None  # two-sided clipping (INTELLECT-2): cap the ratio at delta (> 1 + epsilon_high)
    importance_sampling_level: Literal[IMPORTANCE_SAMPLING_LEVELS] = "token"  # sequence = GSPO
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature for positive advantages
    sapo_temperature_neg: float = 1.05  # ... and for the others
    vespo_k_pos: float = 2.0  # vespo's weight shape phi(w) = e^lambda w^k e^(-lambda w), A >= 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # ... and for A < 0
    vespo_lambda_neg: float = 2.0
    mask_truncated_completions: bool = False  # completions cut off by max_completion_length get no loss
    top_entropy_quantile: float = 1.0  # train only on the top quantile of tokens by entropy (0.2 suggested)
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * mean token entropy
    # Adaptive entropy control (Skywork-OR1, see entropy_control.py): entropy_coef is the starting
    # value, moved by entropy_coef_delta after each update towards keeping the mean token
    # entropy above entropy_target (nats), within [entropy_coef_min, entropy_coef_max].
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    off_policy_mask_threshold: float | None = None  # drop A<0 sequences whose policy drifted more (DeepSeek-V3.2)
    scale_rewards: Literal[SCALE_REWARDS] = "group"  # "none" = Dr. GRPO
    # How several reward functions combine: sum then normalise per group, or (GDPO) normalise
    # each function per group, sum, then normalise over the batch (scale_rewards is then unused).
    multi_objective_aggregation: Literal[MULTI_OBJECTIVE_AGGREGATIONS] = "sum_then_normalize"
    num_iterations: int = 1  # policy updates per batch of rollouts (>1 needs old log-probs)
    # Groups whose rewards are all equal have advantage 0: no policy gradient, only cost (DAPO's
    # dynamic sampling). keep: train on them anyway (TRL); skip: leave them out of the
    # log-prob and backward passes; resample: generate for fresh prompts until prompts_per_step
    # groups are informative or max_resample_rounds extra rounds have run.
    zero_std_groups: Literal["keep", "skip", "resample"] = "keep"
    max_resample_rounds: int = 3

    # --- optimisation ------------------------------------------------------------------------
    max_steps: int = 100
    prompts_per_step: int = 4  # prompts per optimizer step; each brings G completions
    micro_batch_size: Union[int, Literal["auto"]] = 4  # sequences per forward/backward
    logprob_chunk_size: Union[int, Literal["auto"]] = 256  # positions per LM-head chunk
    vram_gb: float | None = None  # memory budget for "auto" settings; None = what the GPU has free
    learning_rate: float = 1e-5
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # paged_adamw_8bit (bitsandbytes) saves optimizer memory on GPU; adamw works everywhere.
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    seed: int = 42
    # CPU threads for torch (0 = torch's default). Tiny models run faster on 1: for their small
    # matrices, handing work between threads costs more than the work itself.
    cpu_threads: int = 0

    # --- output ------------------------------------------------------------------------------
    output_dir: str = "runs/latest"
    save_every: int = 50  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted; 0 keeps all
    log_completions_every: int = 10  # append sampled completions to completions.jsonl
    num_completions_to_log: int = 4
    eval_every: int = 0  # evaluate on the eval split every N steps (0 = never); logs eval/* metrics
    # Also send metrics to these tools when installed: tensorboard, wandb, trackio.
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=list)

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
        need(bool(self.rewards), "rewards", "at least one reward function is needed")
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
        need(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
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
