#!/usr/bin/env python
"""Benchmark lowvram-grpo's trainer against TRL's GRPOTrainer: same model, same settings, same run.

    python -m bench.bench_grpo                                   # CPU, builtin:tiny (CI, ~1-3 min)
    python -m bench.bench_grpo --device cuda --arch qwen2.5-1.5b # GPU, random weights, G=8, 256+1024
    python -m bench.bench_grpo --device cuda --arch qwen2.5-7b --only ours --target-gb 12
    python -m bench.bench_grpo --arch qwen2.5-0.5b --tiny-shape --prompt-length 16 --completion-length 8 \
        --prompts-per-step 1 --num-generations 2 --micro-batch-size 2 --no-docs   # CPU dry run of the GPU path

Both trainers get the same checkpoint directory (4-bit NF4 with double quantisation, the same
compute dtype), the same LoRA (rank, alpha, dropout, all-linear), the same G, prompts per step,
micro-batch, prompt and completion lengths, beta, loss_type, epsilon, temperature, learning rate
(constant schedule), optimizer (torch AdamW), gradient checkpointing (non-reentrant), seed,
prompts and reward function. Our trainer generates all of a step's sequences in one chunk, as
TRL does, so both do the same work; `--ours-generation-chunk-size` shows the effect of ours'
chunking separately. `--only ours` runs our trainer alone (with `--target-gb`, against a memory
target).

Each trainer runs in its own subprocess, so peak memory is its own:
- CPU: the process's peak resident memory (VmHWM); the RSS right after imports (Python, torch,
  each trainer's libraries) is reported too, since that baseline is not training memory.
- CUDA: torch.cuda.max_memory_allocated, reset at the start of every step and read at its end,
  max over the measured steps (the same protocol as our trainer's `peak_memory_gb` metric).
Step time is the median over the measured steps, after `--warmup` steps; generated tokens per
second is the completion tokens of the measured steps over their total time. On the CPU the
median CPU time per step (time.process_time, one torch thread) is reported too: unlike wall
time, it hardly moves when other work shares the machine.

Every child writes one line per finished step into the work directory as it goes, so when a
child runs out of time (`--deadline`, `--timeout`) the steps it finished are still reported
(marked as such); with only a warm-up step finished, that step is reported, flagged.

Results are printed as a table and written into docs/benchmarks.md between the markers
`<!-- bench:KEY -->` and `<!-- /bench:KEY -->` (KEY = cpu-tiny, cuda-<arch>, ...): other sections of
the file are left as they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import GIB, Settings
from lowvram_grpo.rundir import read_jsonl

TRAINERS = ("ours", "trl")
LABELS = {"ours": "lowvram-grpo", "trl": "TRL GRPOTrainer"}
REPORT_RESERVE_S = 10  # kept back from --deadline to write the report


# --- preparing the model and the prompts -------------------------------------------------------


def prepare_toy(args, work_dir: Path) -> Settings:
    """builtin:tiny (or --model) and the toy addition task, with the tiny-cpu preset's settings."""
    from lowvram_grpo.builtin import arith
    from lowvram_grpo.config import load_config
    from lowvram_grpo.model import resolve_model_path

    preset = load_config(preset="tiny-cpu")
    model_dir = resolve_model_path(args.model)
    dataset = work_dir / "arith.jsonl"
    common.write_jsonl(dataset, arith.arith_rows(1000, seed=0))
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
    """A random-weight model of a real architecture: G=8, 2 prompts/step, 256 + 1024 tokens by
    default (meant for the GPU; on the CPU pass --tiny-shape and small lengths)."""
    optional = {key: value for key, value in {
        "num_generations": args.num_generations, "prompts_per_step": args.prompts_per_step,
        "prompt_length": args.prompt_length, "completion_length": args.completion_length,
        "micro_batch_size": args.micro_batch_size}.items() if value}
    return common.random_arch_settings(
        args.device, args.arch, work_dir, Path(args.model_cache), tiny_shape=args.tiny_shape,
        generation_chunk_size=args.ours_generation_chunk_size, warmup_steps=args.warmup, steps=args.steps,
        **optional)


# --- the child processes: one trainer each -----------------------------------------------------


def _rss_gb(field: str) -> float:
    """VmRSS / VmHWM (peak) of this process from /proc, in GiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    import resource  # not Linux: ru_maxrss is the peak (kilobytes on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GIB if sys.platform == "darwin" else 2**20)


class StepLog:
    """Appends one JSON line per finished step: what the parent reports if this child is
    stopped before the end."""

    def __init__(self, path: Path, settings: Settings):
        self.path, self.settings = path, settings
        self.cpu_mark = time.process_time()

    def write(self, step_time: float, mean_completion_length: float, reward, cuda_peak_gb: float | None) -> None:
        import torch

        now = time.process_time()
        cuda = self.settings.device == "cuda"
        line = {
            "step_time": step_time,
            # CPU time from one step's end to the next (the first interval also holds model
            # loading: it is a warm-up step, never measured).
            "cpu_step_time": now - self.cpu_mark,
            "completion_tokens": mean_completion_length * self.settings.sequences_per_step,
            "mean_completion_length": mean_completion_length,
            "reward": reward,
            # CUDA: peak allocated during the step (reset at its start); CPU: VmHWM so far.
            "peak_gb": cuda_peak_gb if cuda else _rss_gb("VmHWM"),
            "reserved_gb": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        }
        self.cpu_mark = now
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def child_main(trainer: str, settings_path: Path, run_dir: Path, steps_path: Path, result_path: Path) -> None:
    s = Settings.from_json(settings_path.read_text())
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
    out = run(s, run_dir, StepLog(steps_path, s))
    if s.device == "cpu":
        out["rss_after_imports_gb"] = baseline
    result_path.write_text(json.dumps(out, indent=1))


def run_ours(s: Settings, out_dir: Path, log: StepLog) -> dict:
    from safetensors import safe_open

    from lowvram_grpo.trainer import train

    def on_step(record):
        log.write(record["step_time"], record["completions/mean_length"], record["reward"], record["peak_memory_gb"])

    final = train(s.train_config(out_dir), progress=False, on_step=on_step).adapter
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        trainable = sum(_numel(f.get_slice(name).get_shape()) for name in f.keys())
    return {"trainable_params": trainable}


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def run_trl(s: Settings, out_dir: Path, log: StepLog) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lowvram_grpo.model import load_tokenizer
    from lowvram_grpo.rewards.builtins import arith_answer

    cuda = s.device == "cuda"
    dtype = getattr(torch, s.dtype)

    class StepProbe(TrainerCallback):
        """Per optimizer step: wall time, and (CUDA) peak allocated memory since the step began.
        on_step_begin fires before the step's first micro-batch, whose _prepare_inputs generates
        the rollouts, so generation is inside the timed interval as in our trainer. The step's
        line is written when TRL logs the step's metrics (right after on_step_end)."""

        def __init__(self):
            self.time, self.peak, self._start = 0.0, 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                self.peak = torch.cuda.max_memory_allocated() / GIB
            self.time = time.perf_counter() - self._start

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                log.write(self.time, logs["completions/mean_length"], logs.get("reward"), self.peak)

    rows = [json.loads(line) for line in Path(s.dataset_path).read_text().splitlines() if line.strip()]
    reward = arith_answer if s.reward == "arith" else common.bench_reward
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=s.model_dir, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
            processing_class=load_tokenizer(s.model_dir), quantization_config=quantization, peft_config=lora,
            callbacks=[StepProbe()])
        trainer.train()
    base = trainer.model.get_base_model()
    if not getattr(base, "is_loaded_in_4bit", False):
        raise RuntimeError("TRL's model is not 4-bit: the comparison would be unfair")
    return {"trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


# --- the parent: run the children, summarise, report -------------------------------------------


def run_child(trainer: str, settings: Settings, work_dir: Path, run: int, timeout: float | None) -> dict:
    """One run of one trainer in a child process; returns its status, the steps it finished
    and (if it finished) its final figures."""
    import shutil

    name = f"{trainer}-{run}"
    settings_path = work_dir / "settings.json"
    settings_path.write_text(settings.to_json())
    steps_path, result_path, run_dir = work_dir / f"{name}.steps.jsonl", work_dir / f"{name}.json", work_dir / name
    for stale in (steps_path, result_path):
        stale.unlink(missing_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"running {LABELS[trainer]} ({settings.total_steps} steps) ...", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    status = common.run_logged(
        [sys.executable, "-m", "bench.bench_grpo", "--child", trainer, "--settings", str(settings_path),
         "--run-dir", str(run_dir), "--steps-log", str(steps_path), "--result", str(result_path)],
        work_dir / f"{name}.log", timeout)
    if status == "ok" and not result_path.is_file():
        status = "failed (no result)"
    if status != "ok":
        log = work_dir / f"{name}.log"
        print(f"{LABELS[trainer]} {status}; log {log}:\n{common.log_tail(log)}", file=sys.stderr, flush=True)
    return {"status": status, "steps": read_jsonl(steps_path),
            "final": json.loads(result_path.read_text()) if result_path.is_file() else {},
            # Other work on the machine skews timings; the load average says whether there was any.
            "load_average_before": load}


def pool_runs(runs: list[dict], warmup: int) -> dict | None:
    """One result from repeated runs of a trainer: each run's warm-up steps dropped, the
    measured steps pooled, the highest peak memory kept. If no run got past its warm-up (it
    ran out of time), the warm-up steps are all there is: they are used, flagged. None if not
    one step finished."""
    measured = [step for run in runs for step in run["steps"][warmup:]]
    warmup_only = not measured
    steps = measured or [step for run in runs for step in run["steps"]]
    if not steps:
        return None
    loads = [run["load_average_before"] for run in runs if run.get("load_average_before") is not None]
    finals = [run["final"] for run in runs if run["final"]]
    return {
        **{key: [step[key] for step in steps] for key in ("step_time", "cpu_step_time", "completion_tokens",
                                                           "mean_completion_length", "reward")},
        # CPU: VmHWM only grows, so the highest line over all steps is the process's peak.
        "peak_memory_gb": max(step["peak_gb"] for step in steps),
        "peak_reserved_gb": max((step["reserved_gb"] for step in steps if step.get("reserved_gb") is not None),
                                default=None),
        "rss_after_imports_gb": max((f["rss_after_imports_gb"] for f in finals if "rss_after_imports_gb" in f),
                                    default=None),
        "trainable_params": finals[0]["trainable_params"] if finals else None,
        "load_average_before": statistics.mean(loads) if loads else None,
        "repeats": len(runs),
        "warmup_only": warmup_only,
        "status": "; ".join(sorted({run["status"] for run in runs})),
    }


def summarise(result: dict) -> dict:
    """Median step time, tokens per second and the rest, from a pooled result."""
    times, tokens = result["step_time"], result["completion_tokens"]
    return {
        "peak_memory_gb": result["peak_memory_gb"],
        "peak_reserved_gb": result.get("peak_reserved_gb"),
        "rss_after_imports_gb": result.get("rss_after_imports_gb"),
        "step_time_s": statistics.median(times),
        "cpu_step_time_s": statistics.median(result["cpu_step_time"]),
        "tokens_per_s": sum(tokens) / sum(times),
        "mean_completion_length": statistics.mean(result["mean_completion_length"]),
        "measured_steps": len(times),
        "load_average_before": result.get("load_average_before"),
        "repeats": result.get("repeats", 1),
        "warmup_only": result.get("warmup_only", False),
        "status": result.get("status", "ok"),
    }


def _cell(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


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
        label = LABELS[trainer] + (" (warm-up step only)" if m.get("warmup_only") else "")
        row = [label, f"{m['peak_memory_gb']:.3f}"]
        if device == "cpu":
            row.append(_cell(m.get("rss_after_imports_gb")))
        row.append(f"{m['step_time_s']:.3f}")
        if device == "cpu":
            row.append(f"{m['cpu_step_time_s']:.3f}")
        row += [f"{m['tokens_per_s']:.1f}", f"{m['mean_completion_length']:.2f}"]
        rows.append(row)
    if all(t in summaries for t in TRAINERS):
        ours, trl = summaries["ours"], summaries["trl"]
        ratio = ["ours / TRL", f"{ours['peak_memory_gb'] / trl['peak_memory_gb']:.2f}x"]
        if device == "cpu":
            both = ours.get("rss_after_imports_gb") and trl.get("rss_after_imports_gb")
            ratio.append(f"{ours['rss_after_imports_gb'] / trl['rss_after_imports_gb']:.2f}x" if both else "n/a")
        ratio.append(f"{ours['step_time_s'] / trl['step_time_s']:.2f}x")
        if device == "cpu":
            ratio.append(f"{ours['cpu_step_time_s'] / trl['cpu_step_time_s']:.2f}x")
        ratio += [f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x", ""]
        rows.append(ratio)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def planner_note(settings: Settings, ours: dict | None) -> str | None:
    """Our planner's estimate for these settings next to our trainer's measured peak."""
    if not ours or not settings.arch:
        return None
    from lowvram_grpo.planning.memory import CUDA_OVERHEAD_BYTES, estimate_memory

    estimate = estimate_memory(settings.planner_values(), settings.train_config(Path(tempfile.gettempdir())))
    allocated = estimate.allocated_bytes / GIB
    measured = ("allocated" if settings.device == "cuda"
                else "peak RSS (the whole process: Python and libraries included, not comparable)")
    return (f"Planner check (`lowvram-grpo plan`): estimated {allocated:.2f} GB allocated by torch "
            f"(+ {CUDA_OVERHEAD_BYTES / GIB:.1f} GB CUDA context = {estimate.total_gb:.2f} GB on the card, "
            f"peak phase: {estimate.peak_phase}); measured {ours['peak_memory_gb']:.2f} GB {measured}; "
            f"estimate / measured = {allocated / ours['peak_memory_gb']:.2f}.")


def target_note(settings: Settings, ours: dict | None, target_gb: float | None) -> str | None:
    """Our trainer's peak against a memory target for the whole card. On a GPU the card holds
    what torch's caching allocator reserved plus the CUDA context (outside torch; the
    planner's 0.5 GB figure is used for it)."""
    if not ours or target_gb is None:
        return None
    from lowvram_grpo.planning.memory import CUDA_OVERHEAD_BYTES

    if settings.device == "cuda" and ours.get("peak_reserved_gb") is not None:
        on_card = ours["peak_reserved_gb"] + CUDA_OVERHEAD_BYTES / GIB
        how = (f"peak reserved by torch {ours['peak_reserved_gb']:.2f} GB + {CUDA_OVERHEAD_BYTES / GIB:.1f} GB "
               f"CUDA context = {on_card:.2f} GB (allocated: {ours['peak_memory_gb']:.2f} GB)")
    else:
        on_card = ours["peak_memory_gb"]
        how = f"peak {'RSS' if settings.device == 'cpu' else 'allocated'} {on_card:.2f} GB"
    verdict = "met" if on_card <= target_gb else "NOT met"
    return f"Memory target <= {target_gb:g} GB: {verdict} ({how})."


def docs_section(settings: Settings, summaries: dict, command: str, device: str, notes: list[str]) -> str:
    s = settings
    alone = len(summaries) == 1
    who = f"{LABELS[next(iter(summaries))]} alone" if alone else "lowvram-grpo vs TRL"
    title = f"{who}: {'CPU' if s.device == 'cpu' else 'CUDA'}, {s.model_label}"
    loads = ", ".join(f"{LABELS[t]} {m['load_average_before']:.2f}" for t, m in summaries.items()
                      if m.get("load_average_before") is not None)
    repeats = max((m.get("repeats", 1) for m in summaries.values()), default=1)
    both = "" if alone else "both trainers"
    lines = [
        f"## {title}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {device}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in common.versions().items()),
        f"- Settings{f' ({both})' if both else ''}: 4-bit NF4 (double quant), {s.dtype} compute, LoRA r={s.lora_r} "
        f"alpha={s.lora_alpha} dropout={s.lora_dropout} all-linear, G={s.num_generations}, "
        f"{s.prompts_per_step} prompts/step, micro-batch {s.micro_batch_size}, prompt <= {s.max_prompt_length} + "
        f"completion <= {s.max_completion_length} tokens, beta={s.beta}, loss_type={s.loss_type}, "
        f"temperature={s.temperature}, lr={s.learning_rate} (constant), AdamW, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}; our generation chunk: {s.ours_generation_chunk_size} "
        f"sequences, log-prob chunk {s.logprob_chunk_size}" + ("" if alone else
                                                                f" (TRL generates all {s.sequences_per_step} at once)"),
        f"- Steps: {s.warmup_steps} warm-up + {s.steps} measured per run, {repeats} run(s) per trainer "
        f"(alternating); step time is the median of all measured steps",
    ]
    if s.device == "cpu":
        lines.append(f"- Machine load average (1 min) when each trainer started (mean over runs): {loads or 'n/a'}")
    lines += ["", format_table(summaries, s.device)]
    unfinished = {t: m for t, m in summaries.items() if m["status"] != "ok"}
    if unfinished:
        lines += ["", "Incomplete: " + "; ".join(
            f"{LABELS[t]} {m['status']} after {m['measured_steps']} {'warm-up' if m['warmup_only'] else 'measured'} "
            f"step(s), reported above" for t, m in unfinished.items()) + "."]
    if s.device == "cpu" and not s.tiny_shape:
        lines += ["", "Peak memory on the CPU is each trainer process's peak resident set (VmHWM), which includes "
                  "Python, torch and the libraries each trainer imports (the \"RSS after imports\" column), so for "
                  "a small model it says little about GPU memory. TRL casts the LoRA weights of a quantised "
                  "model to bf16; ours keeps them in fp32."]
    busiest = max((m["load_average_before"] for m in summaries.values() if m.get("load_average_before") is not None),
                  default=0.0)
    if s.device == "cpu" and busiest > 0.5 * (os.cpu_count() or 1):
        lines += ["", f"The machine was busy with other work during this run (load average up to {busiest:.1f} on "
                  f"{os.cpu_count()} cores), so the wall-clock step times and tokens/s carry noise; the alternating "
                  "runs spread it over both trainers, and the CPU-time column is the steadier comparison. Memory "
                  "figures are not affected."]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="builtin:tiny",
                        help="without --arch: the model for the toy task (default builtin:tiny)")
    parser.add_argument("--arch", choices=common.shipped_architectures(),
                        help="a shipped architecture (lowvram_grpo/arch/), built with random weights "
                             "(required with --device cuda)")
    parser.add_argument("--tiny-shape", action="store_true",
                        help="with --arch: the architecture's tiny stand-in (CPU dry runs of the GPU path)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: 20 toy, 2 --arch)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 toy, 1 --arch)")
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--num-generations", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--prompt-length", type=int, help="max prompt length (--arch: exact, random prompts)")
    parser.add_argument("--completion-length", type=int, help="max completion length")
    parser.add_argument("--ours-generation-chunk-size", type=int,
                        help="our generation chunk (default: all sequences at once, like TRL)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="run each trainer this many times, alternating, and pool the steps "
                             "(default: 2 toy, 1 --arch)")
    parser.add_argument("--only", choices=TRAINERS, help="run one trainer")
    parser.add_argument("--target-gb", type=float, help="a memory target for our trainer's peak, reported")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per trainer subprocess")
    common.add_output_arguments(parser)
    # Internal: the child process.
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps-log", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.device == "cuda" and not args.arch:
        parser.error("--device cuda needs --arch (e.g. --arch qwen2.5-7b)")
    if args.tiny_shape and not args.arch:
        parser.error("--tiny-shape needs --arch")
    if args.steps is None:
        args.steps = 2 if args.arch else 20
    if args.warmup is None:
        args.warmup = 1 if args.arch else 2
    if args.repeats is None:
        args.repeats = 1 if args.arch else 2
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def docs_key(args) -> str:
    if args.arch:
        return f"{args.device}-{args.arch}{'-tiny' if args.tiny_shape else ''}"
    if args.model == "builtin:tiny":
        return f"{args.device}-tiny"
    return f"{args.device}-{re.sub(r'[^a-z0-9.]+', '-', args.model.lower())}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, Path(args.settings), Path(args.run_dir), Path(args.steps_log), Path(args.result))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
    key = docs_key(args)
    work_dir = Path(args.work_dir or os.path.join(tempfile.gettempdir(), "lowvram_grpo_bench", "work", key))
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = prepare_random_arch(args, work_dir) if args.arch else prepare_toy(args, work_dir)
    if settings.sequences_per_step % settings.micro_batch_size:
        print(f"error: micro-batch {settings.micro_batch_size} must divide the {settings.sequences_per_step} "
              "sequences of a step (TRL needs whole accumulation steps)", file=sys.stderr)
        return 2

    trainers = [t for t in TRAINERS if not args.only or t == args.only]
    schedule = [t for _ in range(args.repeats) for t in trainers]
    runs: dict[str, list[dict]] = {t: [] for t in trainers}
    # Repeats alternate the trainers (ours, TRL, ours, TRL...) so that a change in the machine's
    # background load during the benchmark falls on both alike. With a deadline, each run gets
    # an equal share of the time left, and what an early one leaves goes to the later ones.
    for index, trainer in enumerate(schedule):
        timeout = args.timeout
        left = common.seconds_left(args.deadline)
        if left is not None:
            share = (left - REPORT_RESERVE_S) / (len(schedule) - index)
            timeout = share if timeout is None else min(timeout, share)
        runs[trainer].append(run_child(trainer, settings, work_dir, len(runs[trainer]), timeout))
    results = {t: pooled for t in trainers if (pooled := pool_runs(runs[t], settings.warmup_steps))}
    summaries = {t: summarise(r) for t, r in results.items()}
    if len(results) == 2 and None not in (results["ours"]["trainable_params"], results["trl"]["trainable_params"]) \
            and results["ours"]["trainable_params"] != results["trl"]["trainable_params"]:
        print(f"warning: trainable parameters differ: ours {results['ours']['trainable_params']:,}, "
              f"TRL {results['trl']['trainable_params']:,}", file=sys.stderr)

    device = common.device_description(args.device)
    if args.device == "cpu":
        device += " (1 torch thread per trainer)"
    notes = [n for n in (planner_note(settings, summaries.get("ours")),
                         target_note(settings, summaries.get("ours"), args.target_gb)) if n]
    command = common.command_line("bench.bench_grpo", argv)
    if summaries:
        text = docs_section(settings, summaries, command, device, notes)
    else:  # out of time before a single step: say so where the figures would be
        who = f"{LABELS[args.only]} alone" if args.only else "lowvram-grpo vs TRL"
        text = "\n".join([f"## {who}: {settings.model_label}", "",
                          f"- Command: `{command}`", f"- Date: {datetime.date.today().isoformat()}",
                          f"- Device: {device}", "",
                          "No figures: " + "; ".join(f"{LABELS[t]} {run['status']} before finishing a step"
                                                     for t in trainers for run in runs[t]) + "."])
    print()
    print(text)
    if not args.no_docs:
        common.update_docs(Path(args.docs), key, text)
        print(f"\nwrote the {key} section of {args.docs}")
    complete = all(run["status"] == "ok" for trainer_runs in runs.values() for run in trainer_runs)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
