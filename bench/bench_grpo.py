#!/usr/bin/env python
"""Benchmark lowvram-grpo's trainer against TRL's GRPOTrainer: same model, same settings, same run.

    python bench/bench_grpo.py                                   # CPU, builtin:tiny (CI, ~1-3 min)
    python bench/bench_grpo.py --device cuda --arch qwen2.5-7b   # GPU, random weights, G=8, 256+1024
    python bench/bench_grpo.py --arch qwen2.5-0.5b --prompt-length 16 --completion-length 8 \
        --prompts-per-step 1 --num-generations 2 --micro-batch-size 2 --no-docs   # CPU dry run of the GPU path

Both trainers get the same checkpoint directory (4-bit NF4 with double quantisation, the same
compute dtype), the same LoRA (rank, alpha, dropout, all-linear), the same G, prompts per step,
micro-batch, prompt and completion lengths, beta, loss_type, epsilon, temperature, learning rate
(constant schedule), optimizer (torch AdamW), gradient checkpointing (non-reentrant), seed,
prompts and reward function. Our trainer generates all of a step's sequences in one chunk, as
TRL does, so both do the same work; `--ours-generation-chunk-size` shows the effect of ours'
chunking separately.

Each trainer runs in its own subprocess, so peak memory is its own:
- CPU: the process's peak resident memory (VmHWM); the RSS right after imports (Python, torch,
  each trainer's libraries) is reported too, since that baseline is not training memory.
- CUDA: torch.cuda.max_memory_allocated, reset at the start of every step and read at its end,
  max over the measured steps (the same protocol as our trainer's `peak_memory_gb` metric).
Step time is the median over the measured steps, after `--warmup` steps; generated tokens per
second is the completion tokens of the measured steps over their total time. On the CPU the
median CPU time per step (time.process_time, one torch thread) is reported too: unlike wall
time, it hardly moves when other work shares the machine.

Results are printed as a table and written into docs/benchmarks.md between the markers
`<!-- bench:KEY -->` and `<!-- /bench:KEY -->` (KEY = cpu-tiny, cuda-<arch>, ...): other sections of
the file are left as they are.

On a GPU with little time (10 minutes a command), run the trainers in separate calls with
`--only ours` then `--only trl`: results are kept in --work-dir, and the second call prints the
comparison once both exist for the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
TRAINERS = ("ours", "trl")
LABELS = {"ours": "lowvram-grpo", "trl": "TRL GRPOTrainer"}
GIB = 2**30


# --- the settings both trainers get ------------------------------------------------------------


@dataclass
class Settings:
    device: str  # cpu | cuda
    model_dir: str
    model_label: str
    dataset_path: str  # JSONL with prompt (and answer) columns
    reward: str  # "arith" (toy.arith_answer) or "bench" (bench_reward below)
    num_generations: int
    prompts_per_step: int
    micro_batch_size: int
    max_prompt_length: int
    max_completion_length: int
    ours_generation_chunk_size: int
    logprob_chunk_size: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    beta: float = 0.04
    loss_type: str = "dapo"
    epsilon: float = 0.2
    temperature: float = 1.0
    learning_rate: float = 1e-5
    gradient_checkpointing: bool = True
    warmup_steps: int = 1  # not timed
    steps: int = 5  # timed
    seed: int = 42
    cpu_threads: int = 1

    @property
    def sequences_per_step(self) -> int:
        return self.num_generations * self.prompts_per_step

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def dtype(self) -> str:
        # Our trainer's "auto": fp32 on the CPU, bf16 on a (recent) GPU. TRL gets the same.
        return "bfloat16" if self.device == "cuda" else "float32"


def bench_reward(prompts, completions, **kwargs) -> list[float]:
    """Reward for the random-weight GPU benchmark: the share of even digits among the digits
    of the completion's text. Cheap, deterministic, and it varies within a group, so the
    advantages are not all zero and the update does real work."""
    rewards = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        digits = [int(c) for c in text if c.isdigit()]
        rewards.append(sum(d % 2 == 0 for d in digits) / max(len(digits), 1))
    return rewards


# --- preparing the model and the prompts -------------------------------------------------------


def prepare_toy(args, work_dir: Path) -> Settings:
    """builtin:tiny (or --model) and the toy addition task, with the tiny-cpu preset's settings."""
    from lowvram_grpo import toy
    from lowvram_grpo.config import load_config
    from lowvram_grpo.model import resolve_model_path

    preset = load_config(preset="tiny-cpu")
    model_dir = resolve_model_path(args.model)
    dataset = work_dir / "arith.jsonl"
    write_jsonl(dataset, toy.arith_rows(1000, seed=0))
    sequences = preset.num_generations * (args.prompts_per_step or preset.prompts_per_step)
    return Settings(
        device=args.device, model_dir=str(model_dir), model_label=args.model, dataset_path=str(dataset), reward="arith",
        num_generations=args.num_generations or preset.num_generations,
        prompts_per_step=args.prompts_per_step or preset.prompts_per_step,
        micro_batch_size=args.micro_batch_size or min(preset.micro_batch_size, sequences),
        max_prompt_length=args.prompt_length or preset.max_prompt_length,
        max_completion_length=args.completion_length or preset.max_completion_length,
        ours_generation_chunk_size=args.ours_generation_chunk_size or sequences,
        lora_r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout,
        beta=preset.beta, loss_type=preset.loss_type, temperature=preset.temperature,
        learning_rate=preset.learning_rate, warmup_steps=args.warmup, steps=args.steps)


def prepare_random_arch(args, work_dir: Path) -> Settings:
    """A random-weight model of a real architecture, and random 256-token prompts.

    Meant for the GPU; on the CPU it is a dry run of the same code (pass small lengths).

    Random weights almost never sample EOS (1 chance in ~150k per token), so every completion
    runs to max_completion_length: the worst case for memory, identical for both trainers.
    """
    prompts_per_step = args.prompts_per_step or 2
    num_generations = args.num_generations or 8
    prompt_length = args.prompt_length or 256
    model_dir = build_random_model(args.arch, Path(args.model_cache) / args.arch)
    dataset = work_dir / f"random-prompts-{prompt_length}.jsonl"
    write_jsonl(dataset, random_prompts(num_rows=64, length=prompt_length, seed=0))
    sequences = num_generations * prompts_per_step
    return Settings(
        device=args.device, model_dir=str(model_dir), model_label=f"{args.arch} (random weights)",
        dataset_path=str(dataset), reward="bench", num_generations=num_generations,
        prompts_per_step=prompts_per_step, micro_batch_size=args.micro_batch_size or 4,
        max_prompt_length=prompt_length, max_completion_length=args.completion_length or 1024,
        ours_generation_chunk_size=args.ours_generation_chunk_size or sequences,
        learning_rate=1e-5, warmup_steps=args.warmup, steps=args.steps)


def build_random_model(arch: str, out_dir: Path, num_hidden_layers: int | None = None) -> Path:
    """Save a random-init bf16 model of a shipped architecture (with only `num_hidden_layers`
    decoder layers, if given) and a tokenizer covering its vocabulary (see bench_tokenizer) to
    `out_dir`, once; later runs reuse it.

    The weights are initialised directly on the GPU in bf16 (an 8B model on the CPU in fp32
    would take minutes and 32 GB), then written as ordinary safetensors so both trainers load
    and quantise them through the same `from_pretrained(quantization_config=...)` path.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowvram_grpo.memory import load_arch

    if (out_dir / "DONE").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    values = load_arch(arch)
    if num_hidden_layers is not None:
        values["num_hidden_layers"] = num_hidden_layers
    tokenizer = bench_tokenizer(values["vocab_size"])
    config = AutoConfig.for_model(**values)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, None
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    (out_dir / "DONE").write_text(f"built in {time.perf_counter() - started:.0f} s\n")
    print(f"built random {arch} in {out_dir} ({time.perf_counter() - started:.0f} s)", flush=True)
    return out_dir


# Prompt characters: printable ASCII without the space. Each is one token (see bench_tokenizer).
PROMPT_CHARS = [chr(c) for c in range(33, 127)]


def bench_tokenizer(vocab_size: int):
    """A character-level tokenizer covering every id of the model's vocabulary.

    Ids 0-2 are <pad>, <eos>, <unk>; then one id per printable ASCII character (prompts are
    written with these, one token per character); the rest are fillers "<t123>" so that any id
    a random model samples decodes to text. Character-level on purpose: for model_type qwen2,
    transformers' AutoTokenizer loads Qwen2Tokenizer whatever tokenizer_config.json says, and
    its byte-level pre-tokenizer keeps single ASCII characters intact (as for builtin:tiny)
    but would break up multi-character words.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    tokens = specials + PROMPT_CHARS
    tokens += [f"<t{i}>" for i in range(len(tokens), vocab_size)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def random_prompts(num_rows: int, length: int, seed: int) -> list[dict]:
    """`num_rows` prompts of exactly `length` tokens: random printable characters."""
    import random

    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice(PROMPT_CHARS) for _ in range(length))} for _ in range(num_rows)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# --- the child processes: one trainer each -----------------------------------------------------


def _rss_gb(field: str) -> float:
    """VmRSS / VmHWM (peak) of this process from /proc, in GiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    import resource  # not Linux: ru_maxrss is the peak (kilobytes on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GIB if sys.platform == "darwin" else 2**20)


def child_main(trainer: str, settings_path: Path, result_path: Path) -> None:
    s = Settings(**json.loads(settings_path.read_text()))
    import torch

    if s.device == "cpu":
        # Both trainers on one thread: tiny matrices are slower with more (see conftest.py).
        torch.set_num_threads(s.cpu_threads)
    if trainer == "ours":
        import lowvram_grpo.trainer  # noqa: F401  (import cost counted in the baseline, like TRL's)
    else:
        import trl  # noqa: F401
    baseline = _rss_gb("VmRSS")
    run = run_ours if trainer == "ours" else run_trl
    out = run(s, Path(tempfile.mkdtemp(prefix=f"bench-{trainer}-")))
    if s.device == "cpu":
        out["peak_memory_gb"] = _rss_gb("VmHWM")
        out["rss_after_imports_gb"] = baseline
    else:
        measured = out["step_peaks_gb"][s.warmup_steps:]
        out["peak_memory_gb"] = max(measured) if measured else max(out["step_peaks_gb"])
    out["trainer"] = trainer
    result_path.write_text(json.dumps(out, indent=1))


def run_ours(s: Settings, out_dir: Path) -> dict:
    from lowvram_grpo.config import load_config
    from lowvram_grpo.rundir import read_jsonl
    from lowvram_grpo.trainer import train

    reward = "arith_answer" if s.reward == "arith" else f"{Path(__file__).resolve()}:bench_reward"
    config = load_config(overrides={
        "model_name_or_path": s.model_dir, "quantization": "nf4", "dtype": s.dtype,
        "dataset": s.dataset_path, "answer_column": "answer" if s.reward == "arith" else None,
        "rewards": [{"name": reward, "weight": 1.0}],
        "num_generations": s.num_generations, "prompts_per_step": s.prompts_per_step,
        "generation_chunk_size": s.ours_generation_chunk_size, "micro_batch_size": s.micro_batch_size,
        "logprob_chunk_size": s.logprob_chunk_size,
        "max_prompt_length": s.max_prompt_length, "max_completion_length": s.max_completion_length,
        "temperature": s.temperature, "top_p": 1.0, "top_k": 0,
        "beta": s.beta, "loss_type": s.loss_type, "epsilon": s.epsilon, "scale_rewards": "group",
        "lora_r": s.lora_r, "lora_alpha": s.lora_alpha, "lora_dropout": s.lora_dropout,
        "lora_target_modules": "all-linear", "gradient_checkpointing": s.gradient_checkpointing,
        "learning_rate": s.learning_rate, "lr_scheduler": "constant", "warmup_steps": 0, "optimizer": "adamw",
        "max_steps": s.total_steps, "seed": s.seed, "cpu_threads": s.cpu_threads if s.device == "cpu" else 0,
        "save_every": 10**6, "log_completions_every": 10**6, "output_dir": str(out_dir)})
    # CPU time per step, from one step's end to the next (the trainer's own step_time is wall
    # time): on a machine busy with other work it is the steadier figure.
    cpu_marks = [time.process_time()]
    final = train(config, progress=False, on_step=lambda record: cpu_marks.append(time.process_time())).adapter
    records = read_jsonl(out_dir / "metrics.jsonl")
    from safetensors import safe_open

    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        trainable = sum(_numel(f.get_slice(name).get_shape()) for name in f.keys())
    return {
        "trainable_params": trainable,
        "step_times": [r["step_time"] for r in records],
        # The first interval also holds model loading; it is a warm-up step, never measured.
        "cpu_step_times": [b - a for a, b in zip(cpu_marks, cpu_marks[1:])],
        "completion_tokens": [r["completions/mean_length"] * s.sequences_per_step for r in records],
        "mean_completion_length": [r["completions/mean_length"] for r in records],
        "step_peaks_gb": [r["peak_memory_gb"] for r in records],
        "reward": [r["reward"] for r in records],
    }


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def run_trl(s: Settings, out_dir: Path) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lowvram_grpo import toy
    from lowvram_grpo.model import load_tokenizer

    cuda = s.device == "cuda"
    dtype = getattr(torch, s.dtype)

    class StepProbe(TrainerCallback):
        """Per optimizer step: wall time, and (CUDA) peak allocated memory since the step began.
        on_step_begin fires before the step's first micro-batch, whose _prepare_inputs generates
        the rollouts, so generation is inside the timed interval as in our trainer."""

        def __init__(self):
            self.times, self.cpu_times, self.peaks, self._start, self._cpu_start = [], [], [], 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                self.peaks.append(torch.cuda.max_memory_allocated() / GIB)
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)

    rows = [json.loads(line) for line in Path(s.dataset_path).read_text().splitlines() if line.strip()]
    reward = toy.arith_answer if s.reward == "arith" else bench_reward
    args = GRPOConfig(
        output_dir=str(out_dir), report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        max_steps=s.total_steps, seed=s.seed, use_cpu=not cuda, bf16=cuda and s.dtype == "bfloat16", fp16=False,
        # One optimizer step per generation of P*G sequences, micro-batches of micro_batch_size.
        per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.sequences_per_step // s.micro_batch_size,
        num_generations=s.num_generations, max_completion_length=s.max_completion_length,
        temperature=s.temperature, top_p=1.0, top_k=0,
        beta=s.beta, loss_type=s.loss_type, epsilon=s.epsilon, scale_rewards="group", num_iterations=1,
        learning_rate=s.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch",
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old
        # name is a deprecated alias that TRL defaults to True): set the new one explicitly.
        activation_checkpointing=s.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if s.gradient_checkpointing else None,
        model_init_kwargs={"dtype": dtype, "device_map": {"": "cuda" if cuda else "cpu"}},
        log_completions=False, dataloader_num_workers=0,
    )
    # Exactly what lowvram_grpo.model.load_policy builds.
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    probe = StepProbe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=s.model_dir, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
            processing_class=load_tokenizer(s.model_dir), quantization_config=quantization, peft_config=lora,
            callbacks=[probe])
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    base = trainer.model.get_base_model()
    if not getattr(base, "is_loaded_in_4bit", False):
        raise RuntimeError("TRL's model is not 4-bit: the comparison would be unfair")
    return {
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "step_times": probe.times,
        "cpu_step_times": probe.cpu_times,
        "completion_tokens": [entry["completions/mean_length"] * s.sequences_per_step for entry in logs],
        "mean_completion_length": [entry["completions/mean_length"] for entry in logs],
        "step_peaks_gb": probe.peaks,
        "reward": [entry.get("reward") for entry in logs],
    }


# --- the parent: run both, summarise, report ---------------------------------------------------


def run_child(trainer: str, settings: Settings, work_dir: Path, timeout: float | None) -> dict:
    settings_path = work_dir / "settings.json"
    settings_path.write_text(json.dumps(dataclasses.asdict(settings), indent=1))
    result_path = work_dir / f"{trainer}.json"
    result_path.unlink(missing_ok=True)
    log_path = work_dir / f"{trainer}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"running {LABELS[trainer]} ({settings.total_steps} steps) ...", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", trainer,
                               "--settings", str(settings_path), "--result", str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{LABELS[trainer]} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    # Other work on the machine skews timings; the load average says whether there was any.
    result["load_average_before"] = load
    return result


def pool_runs(runs: list[dict], warmup: int) -> dict:
    """One result from repeated runs of a trainer: each run's warm-up steps dropped, the
    measured steps pooled, the highest peak memory kept."""
    pooled = {key: [value for run in runs for value in run[key][warmup:]]
              for key in ("step_times", "cpu_step_times", "completion_tokens", "mean_completion_length", "reward")}
    loads = [run["load_average_before"] for run in runs if run.get("load_average_before") is not None]
    pooled.update({
        "peak_memory_gb": max(run["peak_memory_gb"] for run in runs),
        "rss_after_imports_gb": max((run["rss_after_imports_gb"] for run in runs if "rss_after_imports_gb" in run),
                                    default=None),
        "trainable_params": runs[0]["trainable_params"],
        "load_average_before": statistics.mean(loads) if loads else None,
        "repeats": len(runs),
    })
    return pooled


def summarise(result: dict) -> dict:
    """Median step time, tokens per second and the rest, from a pooled result."""
    times, tokens, lengths = result["step_times"], result["completion_tokens"], result["mean_completion_length"]
    return {
        "peak_memory_gb": result["peak_memory_gb"],
        "rss_after_imports_gb": result.get("rss_after_imports_gb"),
        "step_time_s": statistics.median(times),
        "cpu_step_time_s": statistics.median(result["cpu_step_times"]),
        "tokens_per_s": sum(tokens) / sum(times),
        "mean_completion_length": statistics.mean(lengths),
        "measured_steps": len(times),
        "load_average_before": result.get("load_average_before"),
        "repeats": result.get("repeats", 1),
    }


def format_table(summaries: dict[str, dict], device: str) -> str:
    """A Markdown table: one row per trainer and a ratio row (ours / TRL)."""
    memory = "peak RSS (GB)" if device == "cpu" else "peak GPU memory allocated (GB)"
    head = ["trainer", memory]
    if device == "cpu":
        head.append("RSS after imports (GB)")
    head += ["step time, median (s)"]
    if device == "cpu":
        head.append("CPU time per step, median (s)")
    head += ["generated tokens/s", "mean completion length"]
    rows = []
    for trainer in TRAINERS:
        if trainer not in summaries:
            continue
        m = summaries[trainer]
        row = [LABELS[trainer], f"{m['peak_memory_gb']:.3f}"]
        if device == "cpu":
            row.append(f"{m['rss_after_imports_gb']:.3f}")
        row.append(f"{m['step_time_s']:.3f}")
        if device == "cpu":
            row.append(f"{m['cpu_step_time_s']:.3f}")
        row += [f"{m['tokens_per_s']:.1f}", f"{m['mean_completion_length']:.2f}"]
        rows.append(row)
    if all(t in summaries for t in TRAINERS):
        ours, trl = summaries["ours"], summaries["trl"]
        ratio = ["ours / TRL", f"{ours['peak_memory_gb'] / trl['peak_memory_gb']:.2f}x"]
        if device == "cpu":
            ratio.append(f"{ours['rss_after_imports_gb'] / trl['rss_after_imports_gb']:.2f}x")
        ratio.append(f"{ours['step_time_s'] / trl['step_time_s']:.2f}x")
        if device == "cpu":
            ratio.append(f"{ours['cpu_step_time_s'] / trl['cpu_step_time_s']:.2f}x")
        ratio += [f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x", ""]
        rows.append(ratio)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "trl", "peft", "bitsandbytes")}


def device_description(device: str) -> str:
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GIB:.0f} GiB"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib * 1024 / GIB:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores{memory} (1 torch thread per trainer)"


def planner_note(settings: Settings, ours: dict | None, arch: str | None) -> str | None:
    """On CUDA: our planner's estimate for these settings next to the measured peak."""
    if settings.device != "cuda" or not ours or not arch:
        return None
    from lowvram_grpo.config import TrainConfig
    from lowvram_grpo.memory import CUDA_OVERHEAD_BYTES, GIB as _GIB, estimate_memory, load_arch

    config = TrainConfig(
        model_name_or_path=settings.model_dir, num_generations=settings.num_generations,
        prompts_per_step=settings.prompts_per_step, generation_chunk_size=settings.ours_generation_chunk_size,
        micro_batch_size=settings.micro_batch_size, logprob_chunk_size=settings.logprob_chunk_size,
        max_prompt_length=settings.max_prompt_length, max_completion_length=settings.max_completion_length,
        lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        beta=settings.beta, dtype="bfloat16")
    estimate = estimate_memory(load_arch(arch), config)
    allocated = estimate.allocated_bytes / _GIB
    return (f"Planner check (`lowvram-grpo plan`): estimated {allocated:.2f} GB allocated by torch "
            f"(+ {CUDA_OVERHEAD_BYTES / _GIB:.1f} GB CUDA context = {estimate.total_gb:.2f} GB on the card, "
            f"peak phase: {estimate.peak_phase}); measured {ours['peak_memory_gb']:.2f} GB allocated.")


def docs_section(key: str, settings: Settings, summaries: dict, command: str, device: str, note: str | None) -> str:
    s = settings
    title = (f"CPU, {s.model_label}" if s.device == "cpu" else f"CUDA, {s.model_label}")
    loads = ", ".join(f"{LABELS[t]} {m['load_average_before']:.2f}" for t, m in summaries.items()
                      if m.get("load_average_before") is not None)
    repeats = max(m.get("repeats", 1) for m in summaries.values())
    lines = [
        f"## lowvram-grpo vs TRL: {title}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {device}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- Settings (both trainers): 4-bit NF4 (double quant), {s.dtype} compute, LoRA r={s.lora_r} "
        f"alpha={s.lora_alpha} dropout={s.lora_dropout} all-linear, G={s.num_generations}, "
        f"{s.prompts_per_step} prompts/step, micro-batch {s.micro_batch_size}, prompt <= {s.max_prompt_length} + "
        f"completion <= {s.max_completion_length} tokens, beta={s.beta}, loss_type={s.loss_type}, "
        f"temperature={s.temperature}, lr={s.learning_rate} (constant), AdamW, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}; our generation chunk: {s.ours_generation_chunk_size} "
        f"sequences (TRL generates all {s.sequences_per_step} at once)",
        f"- Steps: {s.warmup_steps} warm-up + {s.steps} measured per run, {repeats} run(s) per trainer "
        f"(alternating); step time is the median of all measured steps",
        f"- Machine load average (1 min) when each trainer started (mean over runs): {loads or 'n/a'}",
        "",
        format_table(summaries, s.device),
    ]
    if s.device == "cpu":
        lines += ["", "Peak memory on the CPU is each trainer process's peak resident set (VmHWM), which includes "
                  "Python, torch and the libraries each trainer imports (the \"RSS after imports\" column), so for "
                  "a small model it says little about GPU memory. TRL casts the LoRA weights of a quantised "
                  "model to bf16; ours keeps them in fp32."]
    busiest = max((m["load_average_before"] for m in summaries.values() if m.get("load_average_before") is not None),
                  default=0.0)
    if busiest > 0.5 * (os.cpu_count() or 1):
        lines += ["", f"The machine was busy with other work during this run (load average up to {busiest:.1f} on "
                  f"{os.cpu_count()} cores), so the wall-clock step times and tokens/s carry noise; the alternating "
                  "runs spread it over both trainers, and the CPU-time column is the steadier comparison. Memory "
                  "figures are not affected."]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def update_docs(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section between `<!-- bench:KEY -->` and `<!-- /bench:KEY -->`,
    leaving everything else in the file untouched."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        text = ("# Benchmarks\n\nlowvram-grpo against TRL's `GRPOTrainer` with identical settings, produced by "
                "`bench/bench_grpo.py` (each section below is rewritten by the run it names).\n")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="builtin:tiny",
                        help="without --arch: the model for the toy task (default builtin:tiny)")
    parser.add_argument("--arch", choices=sorted(p.stem for p in (REPO_ROOT / "lowvram_grpo" / "arch").glob("*.json")),
                        help="a shipped architecture (lowvram_grpo/arch/), built with random weights "
                             "(required with --device cuda)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: 20 toy, 2 --arch)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 toy, 1 --arch)")
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--num-generations", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--prompt-length", type=int, help="max prompt length (CUDA: exact, random prompts)")
    parser.add_argument("--completion-length", type=int, help="max completion length")
    parser.add_argument("--ours-generation-chunk-size", type=int,
                        help="our generation chunk (default: all sequences at once, like TRL)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="run each trainer this many times, alternating, and pool the steps "
                             "(default: 2 toy, 1 --arch)")
    parser.add_argument("--only", choices=TRAINERS, help="run one trainer; compare with the other's saved result")
    parser.add_argument("--docs", default=str(DEFAULT_DOCS),
                        help="Markdown file to update (default docs/benchmarks.md)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch the docs")
    parser.add_argument("--work-dir", help="where settings, logs and results go (default: a temp dir)")
    parser.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "lowvram_grpo_bench"),
                        help="CUDA: where random models are saved and reused")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per trainer subprocess")
    # Internal: the child process.
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.device == "cuda" and not args.arch:
        parser.error("--device cuda needs --arch (e.g. --arch qwen2.5-7b)")
    if args.steps is None:
        args.steps = 2 if args.arch else 20
    if args.warmup is None:
        args.warmup = 1 if args.arch else 2
    if args.repeats is None:
        args.repeats = 1 if args.arch else 2
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, Path(args.settings), Path(args.result))
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
    if args.arch:
        key = f"{args.device}-{args.arch}"
    elif args.model == "builtin:tiny":
        key = f"{args.device}-tiny"
    else:
        key = f"{args.device}-{re.sub(r'[^a-z0-9.]+', '-', args.model.lower())}"
    work_dir = Path(args.work_dir or os.path.join(tempfile.gettempdir(), "lowvram_grpo_bench", "work", key))
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = prepare_random_arch(args, work_dir) if args.arch else prepare_toy(args, work_dir)
    if settings.sequences_per_step % settings.micro_batch_size:
        print(f"error: micro-batch {settings.micro_batch_size} must divide the {settings.sequences_per_step} "
              "sequences of a step (TRL needs whole accumulation steps)", file=sys.stderr)
        return 2

    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {t: [] for t in TRAINERS}
    # Repeats alternate the trainers (ours, TRL, ours, TRL...) so that a change in the machine's
    # background load during the benchmark falls on both alike.
    for _ in range(args.repeats):
        for trainer in TRAINERS:
            if not args.only or trainer == args.only:
                runs[trainer].append(run_child(trainer, settings, work_dir, args.timeout))
    for trainer in TRAINERS:
        if runs[trainer]:
            results[trainer] = pool_runs(runs[trainer], settings.warmup_steps)
            _save_result(work_dir, trainer, settings, results[trainer])
        elif saved := _saved_result(work_dir, trainer, settings):
            results[trainer] = saved
    summaries = {t: summarise(r) for t, r in results.items()}
    if len(results) == 2 and results["ours"]["trainable_params"] != results["trl"]["trainable_params"]:
        print(f"warning: trainable parameters differ: ours {results['ours']['trainable_params']:,}, "
              f"TRL {results['trl']['trainable_params']:,}", file=sys.stderr)

    device = device_description(args.device)
    command = shlex.join(["python", "bench/bench_grpo.py", *(argv if argv is not None else sys.argv[1:])])
    table = format_table(summaries, settings.device)
    note = planner_note(settings, results.get("ours"), args.arch)
    print()
    print(f"{settings.model_label} on {device}")
    print(table)
    if note:
        print(note)
    if len(summaries) < len(TRAINERS):
        missing = [t for t in TRAINERS if t not in summaries]
        print(f"(no saved result for {', '.join(missing)} with these settings: run with --only {missing[0]})")
    elif not args.no_docs:
        update_docs(Path(args.docs), key, docs_section(key, settings, summaries, command, device, note))
        print(f"\nwrote the {key} section of {args.docs}")
    return 0


def _save_result(work_dir: Path, trainer: str, settings: Settings, result: dict) -> None:
    (work_dir / f"{trainer}.saved.json").write_text(json.dumps(
        {"settings": dataclasses.asdict(settings), "result": result}, indent=1))


def _saved_result(work_dir: Path, trainer: str, settings: Settings) -> dict | None:
    path = work_dir / f"{trainer}.saved.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved["settings"] == dataclasses.asdict(settings) else None


if __name__ == "__main__":
    sys.exit(main())
