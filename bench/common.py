"""What the benchmark scripts share.

- `Settings`: one benchmark run's settings, and `Settings.train_config`, their one mapping to
  our `TrainConfig` (the trainer runs it; the planner estimates it).
- Random-weight models of the shipped architectures (`lowvram_grpo/arch/`), or of a tiny shape
  of the same model type for dry runs on the CPU, with a character-level tokenizer covering the
  whole vocabulary, random prompts of an exact token length and a cheap reward.
- The docs writer (`update_docs`), library versions and a description of the device.
- `run_logged`: a subprocess with a time limit, its output in a log file. Every measurement
  runs in a child process: its peak memory is its own, and a part that runs out of time can be
  stopped while its parent still reports what was measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
GIB = 2**30
# The reward as our trainer loads it (a dotted import path: the children run with the repository
# root on PYTHONPATH).
REWARD_SPEC = "bench.common.bench_reward"

# A dry run's stand-in for an architecture: the same model type (so the same transformers code,
# bitsandbytes layers and LoRA targets) with small dimensions. The vocabulary stays larger than
# the prompt characters (see bench_tokenizer) and large enough that the LM head matters.
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096}


def shipped_architectures() -> list[str]:
    return sorted(p.stem for p in (REPO_ROOT / "lowvram_grpo" / "arch").glob("*.json"))


def arch_values(arch: str, tiny: bool = False, num_hidden_layers: int | None = None) -> dict:
    """A shipped architecture's config values (what `lowvram_grpo.planning.memory` plans with), or its
    tiny stand-in, optionally with fewer decoder layers."""
    from lowvram_grpo.planning.model_shape import load_arch

    values = load_arch(arch)
    if tiny:
        values.update(TINY_SHAPE)
    if num_hidden_layers is not None:
        values["num_hidden_layers"] = num_hidden_layers
    return values


# --- the settings of one benchmark run ---------------------------------------------------------


@dataclass
class Settings:
    device: str  # cpu | cuda
    model_dir: str
    model_label: str
    dataset_path: str  # JSONL with prompt (and answer) columns
    reward: str  # "arith" (rewards.builtins.arith_answer) or "bench" (bench_reward below)
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
    arch: str | None = None  # a shipped architecture (random weights), or None for the toy model
    tiny_shape: bool = False  # the architecture's tiny stand-in (dry runs)

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

    def train_config(self, output_dir: str | Path, **overrides):
        """Our trainer's configuration for these settings (validated like a user's config);
        `overrides` are further TrainConfig keys (e.g. save_every)."""
        from lowvram_grpo.config import load_config

        reward = "arith_answer" if self.reward == "arith" else REWARD_SPEC
        return load_config(overrides={
            "model_name_or_path": self.model_dir, "quantization": "nf4", "dtype": self.dtype,
            "dataset": self.dataset_path, "answer_column": "answer" if self.reward == "arith" else None,
            "rewards": [{"name": reward, "weight": 1.0}],
            "num_generations": self.num_generations, "prompts_per_step": self.prompts_per_step,
            "generation_chunk_size": self.ours_generation_chunk_size, "micro_batch_size": self.micro_batch_size,
            "logprob_chunk_size": self.logprob_chunk_size,
            "max_prompt_length": self.max_prompt_length, "max_completion_length": self.max_completion_length,
            "temperature": self.temperature, "top_p": 1.0, "top_k": 0,
            "beta": self.beta, "loss_type": self.loss_type, "epsilon": self.epsilon, "scale_rewards": "group",
            "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "lora_target_modules": "all-linear", "gradient_checkpointing": self.gradient_checkpointing,
            "learning_rate": self.learning_rate, "lr_scheduler": "constant", "warmup_steps": 0,
            "optimizer": "adamw", "max_steps": self.total_steps, "seed": self.seed,
            "cpu_threads": self.cpu_threads if self.device == "cpu" else 0,
            "save_every": 10**6, "log_completions_every": 10**6, "output_dir": str(output_dir), **overrides})

    def planner_values(self) -> dict | None:
        """The architecture the planner should estimate these settings with (None: the toy model)."""
        return arch_values(self.arch, self.tiny_shape) if self.arch else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


def random_arch_settings(device: str, arch: str, work_dir: Path, model_cache: Path, *, tiny_shape: bool = False,
                         num_generations: int = 8, prompts_per_step: int = 2, prompt_length: int = 256,
                         completion_length: int = 1024, micro_batch_size: int = 4,
                         generation_chunk_size: int | None = None, logprob_chunk_size: int = 256,
                         warmup_steps: int = 1, steps: int = 2) -> Settings:
    """A random-weight model of a real architecture (built once into `model_cache`) and random
    prompts of exactly `prompt_length` tokens.

    Random weights almost never sample EOS (1 chance in ~150k per token), so every completion
    runs to `completion_length`: the worst case for memory, identical for every trainer.
    """
    model_dir = build_random_model(arch, model_cache / (f"{arch}-tiny" if tiny_shape else arch), tiny=tiny_shape)
    dataset = work_dir / f"random-prompts-{prompt_length}.jsonl"
    write_jsonl(dataset, random_prompts(num_rows=64, length=prompt_length, seed=0))
    sequences = num_generations * prompts_per_step
    return Settings(
        device=device, model_dir=str(model_dir),
        model_label=f"{arch} ({'tiny stand-in, ' if tiny_shape else ''}random weights)",
        dataset_path=str(dataset), reward="bench", num_generations=num_generations,
        prompts_per_step=prompts_per_step, micro_batch_size=micro_batch_size, max_prompt_length=prompt_length,
        max_completion_length=completion_length, ours_generation_chunk_size=generation_chunk_size or sequences,
        logprob_chunk_size=logprob_chunk_size, learning_rate=1e-5, warmup_steps=warmup_steps, steps=steps,
        arch=arch, tiny_shape=tiny_shape)


def bench_reward(prompts, completions, **kwargs) -> list[float]:
    """Reward for the random-weight benchmarks: the share of even digits among the digits of
    the completion's text. Cheap, deterministic, and it varies within a group, so the
    advantages are not all zero and the update does real work."""
    rewards = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        digits = [int(c) for c in text if c.isdigit()]
        rewards.append(sum(d % 2 == 0 for d in digits) / max(len(digits), 1))
    return rewards


# --- random-weight models ----------------------------------------------------------------------


def build_random_model(arch: str, out_dir: Path, num_hidden_layers: int | None = None, tiny: bool = False) -> Path:
    """Save a random-init bf16 model of a shipped architecture (its tiny stand-in with `tiny`;
    only `num_hidden_layers` decoder layers, if given) and a tokenizer covering its vocabulary
    (see bench_tokenizer) to `out_dir`, once; later runs reuse it.

    On a GPU the weights are initialised there in bf16 (an 8B model on the CPU in fp32 would
    take minutes and 32 GB), then written as ordinary safetensors so that every trainer loads
    and quantises them through the same `from_pretrained(quantization_config=...)` path.
    """
    if (out_dir / "DONE").is_file():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    # The bench tokenizer's special ids (see bench_tokenizer), not the real model's.
    values = {**arch_values(arch, tiny, num_hidden_layers), "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
    tokenizer = bench_tokenizer(values["vocab_size"])
    config = AutoConfig.for_model(**values)
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
    print(f"built random {arch}{' (tiny)' if tiny else ''} in {out_dir} ({time.perf_counter() - started:.0f} s)",
          flush=True)
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


# --- subprocesses with a time limit --------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of a measuring child: the repository importable, output unbuffered (a
    child that is stopped still shows how far it got)."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def run_logged(argv: list[str], log_path: Path, timeout: float | None) -> str:
    """Run `argv` with its output in `log_path`, for at most `timeout` seconds.

    Returns "ok", "timed out" or "failed (exit N)". A child that runs out of time is killed with
    everything it started (its own process group), so that no GPU memory outlives it; so is a
    child whose parent is asked to stop (SIGTERM) while waiting for it.
    """
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO_ROOT,
                                start_new_session=True)

        def stop(signum, frame):
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            code = proc.wait(timeout=None if timeout is None else max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timed out"
        finally:
            signal.signal(signal.SIGTERM, previous)
    return "ok" if code == 0 else f"failed (exit {code})"


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (a time.time() value), or None without one."""
    return None if deadline is None else deadline - time.time()


# --- reporting -----------------------------------------------------------------------------------


def versions(names=("torch", "transformers", "trl", "peft", "bitsandbytes")) -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in names}


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
    return f"CPU: {model}, {os.cpu_count()} cores{memory}"


def update_docs(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section between `<!-- bench:KEY -->` and `<!-- /bench:KEY -->`,
    leaving everything else in the file untouched."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        text = ("# Benchmarks\n\nlowvram-grpo against TRL's `GRPOTrainer` with identical settings, produced by "
                "`python -m bench.bench_grpo` (each section below is rewritten by the run it names).\n")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, for the docs."""
    import shlex

    return shlex.join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])


def add_output_arguments(parser) -> None:
    """Where a benchmark writes and by when: the arguments bench_grpo and every part of
    bench/gpu_suite.py share, so the suite can pass the same ones to each."""
    import tempfile

    parser.add_argument("--deadline", type=float,
                        help="time.time() by which the report must be written (children share what is left)")
    parser.add_argument("--work-dir", help="where settings, logs and raw results go (default: a temp dir)")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "lowvram_grpo_bench"),
                        help="where random-weight models are saved and reused")
    parser.add_argument("--docs", default=str(DEFAULT_DOCS), help="Markdown file to update (default docs/benchmarks.md)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch the docs")


def add_suite_part_arguments(parser) -> None:
    """The arguments every part of bench/gpu_suite.py takes: the shared output arguments, and
    --child to mark the measuring subprocess."""
    import argparse

    add_output_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)

