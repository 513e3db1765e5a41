"""Generate notebooks/lowvram_grpo_colab.ipynb from the cells below.

The cells live here as plain strings so that a change to the notebook is a readable diff, and
the committed .ipynb carries no outputs. After editing, regenerate it:

    python notebooks/build_notebook.py            # writes the notebook
    python notebooks/build_notebook.py --check    # exit 1 if the committed notebook is stale

tests/test_notebook.py checks that the committed notebook equals this script's output and runs
it headless on the offline `tiny-cpu` preset. The notebook uses only `import lowvram_grpo as lg`
(the public API), so it works unchanged against an installed package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).with_name("lowvram_grpo_colab.ipynb")
REPO_URL = "https://github.com/lowvram-grpo/lowvram-grpo"

# (name, target GPU memory, what it is) for the PRESET form field. tests/test_notebook.py
# checks that this list matches the package's presets, so a new preset is not forgotten here.
PRESETS = [
    ("tiny-cpu", "any, CPU", "offline demo: a tiny model learns single-digit sums in ~1 minute"),
    ("qwen2.5-0.5b-gsm8k", "8 GB", "fastest steps, lowest accuracy"),
    ("qwen2.5-1.5b-gsm8k", "12 GB", "a step up in accuracy"),
    ("qwen2.5-1.5b-reasoning-tags", "12 GB", "teaches the R1 <think>/<answer> format"),
    ("qwen2.5-1.5b-mbpp", "12 GB", "Python functions rewarded by running MBPP's tests (sandboxed)"),
    ("qwen2.5-3b-gsm8k", "16 GB, T4", "the default: a good balance on a T4"),
    ("llama3.2-3b-gsm8k", "16 GB, T4", "gated: needs an HF token with Llama access"),
    ("qwen2.5-7b-gsm8k", "16 GB, T4", "stronger model, slower steps, 384-token answers"),
    ("llama3.1-8b-gsm8k", "16 GB, T4", "gated like Llama 3.2; the slowest"),
    ("qwen3-0.6b-gsm8k", "6 GB", "Qwen3, the smallest; thinking mode off"),
    ("lfm2-1.2b-gsm8k", "6 GB", "Liquid's hybrid convolution/attention model"),
    ("qwen3-1.7b-reasoning-tags", "8 GB", "Qwen3 learns the R1 <think>/<answer> format"),
    ("gemma3-4b-gsm8k", "12 GB, T4", "gated: accept Gemma's licence on the Hub first"),
    ("smollm3-3b-gsm8k", "12 GB, T4", "Hugging Face's fully open 3B"),
    ("qwen3-4b-gsm8k", "12 GB, T4", "Qwen3 4B; thinking mode off"),
    ("qwen3-8b-gsm8k", "16 GB, T4", "Qwen3 8B; thinking mode off"),
    ("qwen3-14b-gsm8k", "24 GB", "Qwen3 14B; too big for a T4"),
    ("qwen3-4b-mbpp", "12 GB, T4", "Qwen3 4B writes Python functions that pass MBPP's tests"),
    ("tiny-cpu-tools", "any, CPU", "offline tools demo: a tiny model learns to call a calculator"),
    ("qwen3-1.7b-gsm8k-python", "8 GB", "Qwen3 1.7B on GSM8K with a sandboxed python tool"),
    ("qwen3-4b-gsm8k-python", "12 GB, T4", "Qwen3 4B on GSM8K with a sandboxed python tool"),
    ("qwen3-1.7b-guess-number", "8 GB", "Qwen3 1.7B plays a number-guessing environment"),
    ("tiny-cpu-vision", "any, CPU", "offline vision demo: a tiny VLM learns to count squares in a picture"),
    ("qwen2.5-vl-3b-geometry", "12 GB, T4", "Qwen2.5-VL solves Geometry3K diagram problems"),
    ("qwen3-vl-8b-geometry", "16 GB, T4", "Qwen3-VL 8B on the same diagrams"),
]
DEFAULT_PRESET = "qwen2.5-3b-gsm8k"


def _preset_table() -> str:
    width = max(len(name) for name, _, _ in PRESETS)
    return "\n".join(f"#   {name.ljust(width)}  {memory:<10} {note}" for name, memory, note in PRESETS)


def _preset_choices() -> str:
    return "[" + ", ".join(f'"{name}"' for name, _, _ in PRESETS) + "]"


HEADER = f"""\
# GRPO fine-tuning on one GPU with lowvram-grpo

This notebook fine-tunes a language model with **GRPO** (the reinforcement-learning method of
DeepSeekMath and DeepSeek-R1) on a single 16 GB GPU, such as Colab's free **T4**: the model is
loaded in 4 bits, only a small **LoRA adapter** trains, and the reference model is the same
weights with the adapter switched off, so no second copy is needed.

For each question it samples a group of answers, scores them with **reward functions** (is the
final number right? is the format right?) and nudges the model towards the answers that scored
above their group's average. You will:

1. install the package, 2. pick a preset, 3. look at the data, 4. look at (and write) reward
functions, 5. check the memory plan, 6. train while the reward is plotted live, 7. compare
answers before and after, 8. save the adapter (and optionally merge it or push it to the Hub).

**Runtime:** *Runtime → Change runtime type → T4 GPU* (any GPU with about 16 GB works; pick a
smaller preset for a smaller card). On a CPU-only runtime choose the `tiny-cpu` preset: it runs
offline in about a minute and shows the whole workflow on a toy task.

GRPO generates many completions per step (4 questions × 8 answers on the GSM8K presets), so a
step takes a while on a T4: try a few steps first, then a longer run. Colab deletes files when
the runtime ends: download the adapter, push it to the Hub, or set `OUTPUT_DIR` to a folder
on Google Drive (`from google.colab import drive; drive.mount("/content/drive")`).

Source and documentation: [{REPO_URL}]({REPO_URL}).
"""

INSTALL_MD = """\
## 1. Install

Installs `lowvram-grpo` from GitHub with pip. Colab already has PyTorch with CUDA; pip adds
transformers, peft, bitsandbytes and datasets. The cell does nothing when the package is
already importable (your own checkout, or CI)."""

INSTALL = f"""\
import importlib.util

if importlib.util.find_spec("lowvram_grpo") is None:
    %pip install --quiet "lowvram-grpo @ git+{REPO_URL}"
else:
    print("lowvram_grpo is already installed: skipping the install")"""

IMPORTS = """\
import dataclasses
import gc

import torch

import lowvram_grpo as lg

print(f"lowvram-grpo {lg.__version__}, torch {torch.__version__}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GB")
else:
    print("No GPU: only the tiny-cpu preset is practical (Runtime -> Change runtime type -> T4 GPU)")"""

PARAMETERS_MD = """\
## 2. Parameters

Everything you would normally change is in this cell (a Colab form: edit the fields on the
right, or the code). Each preset is a tested configuration for a model and a GPU size; the
memory figures are design estimates."""

PARAMETERS = f"""\
# @title Parameters
# Preset: model, dataset, rewards and sizes. Bigger models answer better but step slower.
{_preset_table()}
PRESET = "{DEFAULT_PRESET}"  # @param {_preset_choices()}

# Optimizer steps. More steps learn more but take longer (the presets' full runs are 200-300
# steps); try 5 first to check that everything works.
MAX_STEPS = 100  # @param {{type:"integer"}}

# Empty = the preset's dataset (GSM8K for the *-gsm8k presets). Or a .jsonl/.csv/.parquet file
# (upload it in section 3) or a Hugging Face dataset id. It needs the preset's columns
# (question, answer for GSM8K) or set prompt_column/answer_column in EXTRA_OVERRIDES.
DATASET = ""  # @param {{type:"string"}}

# GPU memory for the memory plan (section 5). A T4 shows 15 GB; lower it to keep headroom.
VRAM_GB = 15  # @param {{type:"number"}}

# Where the run is written (checkpoints, metrics, the adapter). A Google Drive folder survives
# the end of the Colab session; /content does not.
OUTPUT_DIR = "runs/colab"  # @param {{type:"string"}}

# Any other config key (see `lowvram-grpo train --preset X --dry-run`), e.g.
# {{"learning_rate": 5e-6, "max_completion_length": 256, "prompt_column": "problem"}}.
EXTRA_OVERRIDES = {{}}"""

DATA_MD = """\
## 3. Data

Prompts come from the preset's dataset (GSM8K: grade-school maths word problems with a worked
answer ending in `#### 42`) or your own file. Each row gives a prompt; the other columns (such
as `answer`) are handed to the reward functions by name."""

UPLOAD = """\
# Optional: upload your own .jsonl/.csv/.parquet file from your computer (Colab only).
UPLOAD_FILE = False  # @param {type:"boolean"}

if UPLOAD_FILE:
    try:
        from google.colab import files
    except ImportError:
        print("Not running in Colab: set DATASET in the parameters cell to your file's path instead.")
    else:
        uploaded = files.upload()  # opens a file picker; the file lands in the current folder
        DATASET = next(iter(uploaded))
        print(f"DATASET = {DATASET!r}")"""

LOAD_DATA = """\
overrides = {"max_steps": MAX_STEPS, "output_dir": OUTPUT_DIR, **EXTRA_OVERRIDES}
if DATASET:
    overrides["dataset"] = DATASET
config = lg.load_config(preset=PRESET, overrides=overrides)

columns, rows = lg.preview(config.dataset, n=3, config_name=config.dataset_config,
                           split=config.dataset_split)
print(f"dataset {config.dataset}: columns {columns}\\n")
for row in rows:
    for key, value in row.items():
        text = " ".join(str(value).split())
        print(f"  {key}: {text[:200]}{'...' if len(text) > 200 else ''}")
    print()

data = lg.load_prompt_data(config)
print(f"{len(data.train):,} training prompts, {len(data.eval):,} held out for evaluation")
print("\\nThe first prompt, as the model receives it:")
print(data.train[0]["prompt"])"""

REWARDS_MD = """\
## 4. Reward functions

A reward function scores each completion; GRPO pushes the model towards completions that score
above the others in their group. They have TRL's signature, so TRL and open-r1 reward functions
work unchanged:

```python
def my_reward(prompts, completions, **kwargs) -> list[float | None]: ...
```

`completions` are strings (or `[{"role": "assistant", "content": ...}]` for chat prompts), the
dataset's other columns arrive by name (`answer=[...]`), and `None` means "does not apply" (left
out of the weighted sum). The preset chooses the functions and their weights."""

LIST_REWARDS = """\
for name, fn in sorted(lg.BUILTIN_REWARDS.items()):
    summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    print(f"{name:20} {summary}")
for name, summary in lg.REWARD_KINDS.items():
    print(f"{name:20} {summary}")
print("\\nThis run uses:", ", ".join(f"{r.name} (weight {r.weight:g})" for r in config.rewards))"""

NUMERIC_MD = """\
`numeric_answer`: 1.0 when the completion's final number equals the reference answer's. It reads
`<answer>` tags, GSM8K's `#### 42` and `\\boxed{42}`, ignores commas, `$` and units."""

NUMERIC = """\
numeric_answer = lg.BUILTIN_REWARDS["numeric_answer"]
completions = [
    "6 boxes of 7 apples is 42 apples. #### 42",
    "6 boxes of 7 apples is 41 apples. #### 41",
    "<think>6 * 7 = 42</think> <answer>42 apples</answer>",
    "I am not sure.",
]
scores = numeric_answer(prompts=["How many apples?"] * 4, completions=completions,
                        answer=["6 * 7 = 42 #### 42"] * 4)
for completion, score in zip(completions, scores):
    print(f"{score}  {completion}")"""

FORMAT_MD = """\
`format_soft`: 1.0 when the completion has a `<think>...</think>` block followed by an
`<answer>...</answer>` block, anywhere; it gives the model a reason to show its reasoning and
put the answer where `numeric_answer` looks first. It reads no dataset column."""

FORMAT = """\
format_soft = lg.BUILTIN_REWARDS["format_soft"]
completions = [
    "<think>6 * 7 = 42</think> <answer>42</answer>",
    "<answer>42</answer> <think>6 * 7 = 42</think>",
    "The answer is 42.",
]
for completion, score in zip(completions, format_soft(prompts=[""] * 3, completions=completions)):
    print(f"{score}  {completion}")"""

CUSTOM_MD = """\
Your own reward: any function with this signature. `lg.register_reward(name)` makes it usable
by name in the config, next to the built-ins. This one checks that the model stops after its
answer, and returns `None` ("does not apply") when there is no `</answer>` at all."""

CUSTOM = """\
lg.BUILTIN_REWARDS.pop("stops_after_answer", None)  # so this cell can be edited and re-run


@lg.register_reward("stops_after_answer")
def stops_after_answer(prompts, completions, **kwargs):
    \"\"\"1.0 if nothing but whitespace follows </answer>, 0.0 if text does, None without one.\"\"\"
    rewards = []
    for completion in completions:
        text = lg.completion_text(completion)  # a conversation's last message, or the string
        if "</answer>" not in text:
            rewards.append(None)
        else:
            rewards.append(0.0 if text.rsplit("</answer>", 1)[1].strip() else 1.0)
    return rewards


completions = ["<answer>42</answer>", "<answer>42</answer> Hope this helps!", "42"]
for completion, score in zip(completions, stops_after_answer(prompts=[""] * 3, completions=completions)):
    print(f"{score}  {completion}")

# Add it to this run? Keep its weight small: answer correctness should dominate the reward.
USE_CUSTOM_REWARD = False  # @param {type:"boolean"}
if USE_CUSTOM_REWARD and all(r.name != "stops_after_answer" for r in config.rewards):
    config.rewards.append(lg.RewardSpec("stops_after_answer", weight=0.1))
print("\\nThis run uses:", ", ".join(f"{r.name} (weight {r.weight:g})" for r in config.rewards))"""

BEYOND_MD = """\
Rewards beyond rules, by name in `config.rewards` like the built-ins:

- `code_tests` runs the completion's code against the row's `tests` (asserts, or stdin/stdout
  pairs) in a sandbox: no network, read-only files, limits on time, memory and processes. The
  reward is the fraction of tests passed. Try it below.
- `model:<hub id>`: a reward model (a one-label sequence classifier) scores each completion;
  in 4 bits on the GPU, counted by the memory plan.
- `judge:self`: the policy's own base weights (adapter off, no extra memory) rate each
  completion 0-10 (`judge_template` sets the question); `judge:<URL>`: a llama.cpp, Ollama or
  vLLM server does (API key from the environment variable `judge_api_key_env`)."""

BEYOND = """\
code_tests = lg.resolve_reward("code_tests")
tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
completions = [
    "```python\\ndef add(a, b):\\n    return a + b\\n```",
    "```python\\ndef add(a, b):\\n    return 5\\n```",
    "```python\\nimport os\\ndef add(a, b):\\n    return os.system('curl example.com')\\n```",
]
for completion, score in zip(completions, code_tests(prompts=[""] * 3, completions=completions,
                                                      tests=[tests] * 3)):
    print(f"{score:.2f}  {completion.splitlines()[1:3]}")"""

PLAN_MD = """\
## 5. Memory plan

An estimate, from the model's architecture, of the GPU memory each phase of a step needs
(generation, reference log-probs, the update), and the largest chunk sizes that fit in
`VRAM_GB`. Chunk sizes change speed and memory, never the maths."""

PLAN = """\
try:
    memory_plan = lg.plan(config, VRAM_GB)
except ValueError as err:  # e.g. a model whose config cannot be found offline
    memory_plan = None
    print(f"No memory plan: {err}")
else:
    print(lg.format_plan(memory_plan))

# True: use the planner's chunk sizes (faster steps, but the estimate is not yet measured on a
# GPU, so it may run out of memory). False: keep the preset's conservative sizes.
USE_PLANNED_CHUNKS = False  # @param {type:"boolean"}
if memory_plan is not None and not memory_plan.fits:
    print("\\nWARNING: the estimate says this will not fit in VRAM_GB; see the 'to fit' lines above.")
elif memory_plan is not None and USE_PLANNED_CHUNKS:
    config = dataclasses.replace(config, **memory_plan.overrides)
print(f"\\nUsing generation_chunk_size={config.generation_chunk_size} "
      f"micro_batch_size={config.micro_batch_size} logprob_chunk_size={config.logprob_chunk_size}. "
      "Out of memory? Lower generation_chunk_size first, then micro_batch_size.")"""

TRAIN_MD = """\
## 6. Train

The plot updates after every step: the mean reward of the step's completions (noisy: each step
sees new questions), its 10-step moving average and, with several reward functions, each one's
mean. The stop
button (■) ends the run cleanly after the current step and saves a checkpoint;
`lg.train(config, resume=True)` continues from it. Metrics are also written to
`OUTPUT_DIR/metrics.jsonl`."""

TRAIN = """\
%matplotlib inline
import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.ticker import MaxNLocator

history = []
fig, ax = plt.subplots(figsize=(9, 4))
plt.close(fig)  # shown only through the display handle, not again when the cell ends
plot = display(fig, display_id=True)


def value(record, key):
    v = record.get(key)
    return float("nan") if v is None else float(v)


def on_step(record):
    \"\"\"Called by lg.train after every step with that step's metrics: redraw the plot.\"\"\"
    history.append(record)
    steps = [r["step"] for r in history]
    rewards = [value(r, "reward") for r in history]
    window = 10  # moving average over this many steps: smoother, but lags behind
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
              for i in range(len(rewards))]
    ax.clear()
    ax.plot(steps, rewards, "o-", alpha=0.35, label="reward")
    ax.plot(steps, smooth, linewidth=2, label=f"reward, {window}-step average")
    if len(config.rewards) > 1:  # with one function, its line would be the reward's
        for spec in config.rewards:
            ax.plot(steps, [value(r, f"rewards/{spec.name}/mean") for r in history], "--", alpha=0.7,
                    label=f"{spec.name} (weight {spec.weight:g})")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("reward")
    ax.set_title(f"step {record['step']}/{config.max_steps}: reward {value(record, 'reward'):.3f}, "
                 f"kl {value(record, 'kl'):.4f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    plot.update(fig)


result = lg.train(config, on_step=on_step)
adapter_dir = result.adapter  # final/, or the newest checkpoint if the run was stopped
print(f"{result.state} at step {result.step}; adapter: {adapter_dir}")"""

COMPARE_MD = """\
## 7. Before and after

The base model (adapter off) and the trained model (adapter on) answer the same held-out
questions greedily, scored with the run's reward functions. Presets hold out 2% of GSM8K for
this; without a held-out split the first training prompts are used (and a note says so)."""

COMPARE = """\
# More prompts = a more precise comparison, but each is answered twice (base and adapter).
NUM_EVAL_PROMPTS = 50  # @param {type:"integer"}

before, after = lg.compare(config, adapter_dir, max_prompts=NUM_EVAL_PROMPTS)
print(lg.format_comparison(before, after))"""

SIDE_BY_SIDE_MD = """\
A few answers side by side, greedy (the most likely answer, no sampling)."""

SIDE_BY_SIDE = """\
NUM_EXAMPLES = 3  # @param {type:"integer"}

policy, tokenizer = lg.load_policy(dataclasses.replace(config, adapter_path=str(adapter_dir)))
data = lg.load_prompt_data(config, tokenizer)
examples = (data.eval or data.train)[:NUM_EXAMPLES]


def greedy(rows):
    \"\"\"One greedy completion per row (training's own generation path), with whatever
    adapter state `policy` is in.\"\"\"
    return lg.generate_greedy(policy, tokenizer, [lg.model_prompt(r) for r in rows],  # with a row's images
                              max_new_tokens=config.max_completion_length,
                              max_prompt_length=config.max_prompt_length).completions


with lg.reference_model(policy):  # adapter off: the base model
    base_answers = greedy(examples)
tuned_answers = greedy(examples)

for row, base, tuned in zip(examples, base_answers, tuned_answers):
    question = lg.completion_text(row["prompt"])  # a conversation: its last message
    print("=" * 100)
    print(f"PROMPT:    {question}")
    if row.get("answer") is not None:
        print(f"REFERENCE: {' '.join(str(row['answer']).split())}")
    print(f"\\n--- base model ---\\n{base.strip()}")
    print(f"\\n--- with the adapter ---\\n{tuned.strip()}")

del policy  # free the GPU for what comes next
gc.collect()
if torch.cuda.is_available():
    torch.cuda.empty_cache()"""

SAVE_MD = """\
## 8. Save, merge, share

The adapter (a plain PEFT adapter, a few tens of MB) is already saved in the run directory."""

SAVE = """\
import json

for path in sorted(adapter_dir.iterdir()):
    print(f"{path.stat().st_size / 2**20:8.1f} MB  {path}")
base_model = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
print(f\"\"\"
Use it elsewhere (it needs its base model, {base_model}):
  from peft import PeftModel
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained("{base_model}")
  model = PeftModel.from_pretrained(model, "{adapter_dir}")\"\"\")"""

MERGE = """\
# Merge the adapter into a 16-bit copy of the base model: a standalone model for vLLM, TGI or
# llama.cpp (convert to GGUF). Needs about 2 bytes of RAM per parameter: ~6 GB for a 3B model
# fits Colab's RAM, a 7B/8B model does not.
MERGE = False  # @param {type:"boolean"}
MERGED_DIR = f"{OUTPUT_DIR}/merged"

if MERGE:
    merged_dir = lg.merge_adapter(adapter_dir, MERGED_DIR, overwrite=True)
    print(f"merged model: {merged_dir}")
    print(f"GGUF: python llama.cpp/convert_hf_to_gguf.py {merged_dir} --outfile model.gguf --outtype q8_0")
else:
    print("MERGE is False: nothing merged.")"""

PUSH = """\
# Upload to the Hugging Face Hub. Needs a write token: add it as a Colab secret named HF_TOKEN
# (the key icon on the left) or run `from huggingface_hub import login; login()`.
PUSH_TO_HUB = False  # @param {type:"boolean"}
HUB_REPO_ID = "your-username/my-grpo-adapter"  # @param {type:"string"}

if PUSH_TO_HUB:
    if HUB_REPO_ID.startswith("your-username/"):
        raise ValueError("Set HUB_REPO_ID to <your user or organisation>/<repository name> first.")
    from huggingface_hub import HfApi

    folder = MERGED_DIR if MERGE else adapter_dir  # the merged model is GBs, the adapter MBs
    api = HfApi()
    api.create_repo(HUB_REPO_ID, private=True, exist_ok=True)  # private: publish it on the Hub when ready
    api.upload_folder(folder_path=str(folder), repo_id=HUB_REPO_ID,
                      commit_message=f"GRPO {PRESET}, {config.max_steps} steps (lowvram-grpo)")
    print(f"uploaded {folder} to https://huggingface.co/{HUB_REPO_ID}")
else:
    print("PUSH_TO_HUB is False: nothing uploaded.")"""

VISION_MD = """\
## 9. Images: GRPO on a vision-language model

Rows with an `image` (or `images`) column make image prompts: the model sees each picture
before the question, the language model trains (4-bit + LoRA) while the vision tower stays
frozen. The `qwen2.5-vl-3b-geometry` and `qwen3-vl-8b-geometry` presets do this on geometry
diagrams; here the offline `tiny-cpu-vision` demo (CPU, about a minute) teaches a tiny
Qwen2.5-VL to count red squares. Every prompt is the same text, so the answer is only in the
picture: train it, then look at what it answers for a few held-out pictures."""

VISION = """\
RUN_VISION_EXAMPLE = True  # @param {type:"boolean"}
VISION_STEPS = 40  # @param {type:"integer"}

if RUN_VISION_EXAMPLE:
    vision_config = lg.load_config(preset="tiny-cpu-vision", overrides={
        "max_steps": VISION_STEPS, "output_dir": f"{OUTPUT_DIR}-vision"})
    vision_result = lg.train(vision_config, progress=False)
    rows = lg.load_prompt_data(vision_config).eval[:6]  # builtin:squares' own test pictures
    policy, tokenizer = lg.load_policy(dataclasses.replace(vision_config, adapter_path=str(vision_result.adapter)))
    answers = lg.generate_greedy(policy, tokenizer, [lg.model_prompt(r) for r in rows], max_new_tokens=3,
                                 max_prompt_length=vision_config.max_prompt_length).completions
    fig, axes = plt.subplots(1, len(rows), figsize=(2 * len(rows), 2.4))
    for ax, row, answer in zip(axes, rows, answers):
        ax.imshow(row["images"][0])
        ax.set_title(f"says {answer.strip() or '?'} (is {row['answer']})", fontsize="small")
        ax.axis("off")
    plt.show()
    print(f"{sum(a.strip() == r['answer'] for a, r in zip(answers, rows))} of {len(rows)} counted right "
          f"after {vision_result.step} steps")
    del policy
    gc.collect()
else:
    print("RUN_VISION_EXAMPLE is False: skipped.")"""

NEXT_MD = f"""\
## Next steps

- The same run from a terminal: `lowvram-grpo train --preset {DEFAULT_PRESET}` (see `lowvram-grpo --help`).
- Your own data: set `DATASET` (and `prompt_column` / `answer_column` in `EXTRA_OVERRIDES`).
- Your own rewards: write them as in section 4, or load them from a file with
  `{{"rewards": [{{"name": "my_rewards.py:my_reward", "weight": 1.0}}]}}` in `EXTRA_OVERRIDES`.
- Documentation: [{REPO_URL}]({REPO_URL})."""


# (cell id, kind, source, tags). The ids are fixed so the generated file is deterministic;
# tests/test_notebook.py finds cells by them.
CELLS = [
    ("header", "markdown", HEADER, []),
    ("install-md", "markdown", INSTALL_MD, []),
    ("install", "code", INSTALL, []),
    ("imports", "code", IMPORTS, []),
    ("parameters-md", "markdown", PARAMETERS_MD, []),
    ("parameters", "code", PARAMETERS, ["parameters"]),
    ("data-md", "markdown", DATA_MD, []),
    ("upload", "code", UPLOAD, []),
    ("load-data", "code", LOAD_DATA, []),
    ("rewards-md", "markdown", REWARDS_MD, []),
    ("list-rewards", "code", LIST_REWARDS, []),
    ("numeric-answer-md", "markdown", NUMERIC_MD, []),
    ("numeric-answer", "code", NUMERIC, []),
    ("format-soft-md", "markdown", FORMAT_MD, []),
    ("format-soft", "code", FORMAT, []),
    ("custom-reward-md", "markdown", CUSTOM_MD, []),
    ("custom-reward", "code", CUSTOM, []),
    ("beyond-rules-md", "markdown", BEYOND_MD, []),
    ("beyond-rules", "code", BEYOND, []),
    ("plan-md", "markdown", PLAN_MD, []),
    ("plan", "code", PLAN, []),
    ("train-md", "markdown", TRAIN_MD, []),
    ("train", "code", TRAIN, []),
    ("compare-md", "markdown", COMPARE_MD, []),
    ("compare", "code", COMPARE, []),
    ("side-by-side-md", "markdown", SIDE_BY_SIDE_MD, []),
    ("side-by-side", "code", SIDE_BY_SIDE, []),
    ("save-md", "markdown", SAVE_MD, []),
    ("save", "code", SAVE, []),
    ("merge", "code", MERGE, []),
    ("push-to-hub", "code", PUSH, []),
    ("vision-md", "markdown", VISION_MD, []),
    ("vision", "code", VISION, []),
    ("next-md", "markdown", NEXT_MD, []),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs or execution counts."""
    cells = []
    for cell_id, kind, source, tags in CELLS:
        metadata = {"tags": tags} if tags else {}
        if kind == "code":
            cells.append(new_code_cell(source.rstrip("\n"), id=cell_id, metadata=metadata))
        else:
            cells.append(new_markdown_cell(source.rstrip("\n"), id=cell_id, metadata=metadata))
    nb = new_notebook(cells=cells, metadata={
        # Colab opens it on a GPU runtime (a T4) without the user changing anything.
        "accelerator": "GPU",
        "colab": {"gpuType": "T4", "provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def render() -> str:
    """The notebook file's exact text."""
    text = nbformat.writes(build())
    return text if text.endswith("\n") else text + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the notebook is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = NOTEBOOK.read_text(encoding="utf-8") if NOTEBOOK.is_file() else ""
        if current != text:
            print(f"{NOTEBOOK} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    NOTEBOOK.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
