"""The packaged presets: each one loads, validates, dry-runs, documents itself and is sane.

No real model is loaded: these check the files, the config they produce and the CLI around them.
"""

import re
import subprocess
import sys

import pytest
import yaml

from lowvram_grpo.config import list_presets, load_config, preset_path
from lowvram_grpo.rewards.loading import load_reward_functions, resolve_reward
from lowvram_grpo.rewards.scoring import score_completions

PRESETS = list_presets()
GPU_PRESETS = [name for name in PRESETS if not name.startswith("tiny-cpu")]
GSM8K_PRESETS = [name for name in GPU_PRESETS if name.endswith("-gsm8k")]
CODE_PRESETS = [name for name in GPU_PRESETS if name.endswith("-mbpp")]  # rewarded by running tests
# Rewarded by their environment's get_reward(), not by reward functions.
ENVIRONMENT_PRESETS = [name for name in GPU_PRESETS if load_config(preset=name).environment_factory]

EXPECTED = {  # name -> (model, target GB): the table users pick from
    "qwen2.5-0.5b-gsm8k": ("Qwen/Qwen2.5-0.5B-Instruct", 8),
    "qwen2.5-1.5b-gsm8k": ("Qwen/Qwen2.5-1.5B-Instruct", 12),
    "qwen2.5-3b-gsm8k": ("Qwen/Qwen2.5-3B-Instruct", 16),
    "llama3.2-3b-gsm8k": ("meta-llama/Llama-3.2-3B-Instruct", 16),
    "qwen2.5-7b-gsm8k": ("Qwen/Qwen2.5-7B-Instruct", 16),
    "llama3.1-8b-gsm8k": ("meta-llama/Llama-3.1-8B-Instruct", 16),
    "qwen2.5-1.5b-reasoning-tags": ("Qwen/Qwen2.5-1.5B-Instruct", 12),
    "qwen2.5-1.5b-mbpp": ("Qwen/Qwen2.5-1.5B-Instruct", 12),
    # The 2026 models, hub ids as transformers' documentation names them.
    "qwen3-0.6b-gsm8k": ("Qwen/Qwen3-0.6B", 6),
    "lfm2-1.2b-gsm8k": ("LiquidAI/LFM2-1.2B", 6),
    "qwen3-1.7b-reasoning-tags": ("Qwen/Qwen3-1.7B", 8),
    "gemma3-4b-gsm8k": ("google/gemma-3-4b-it", 12),
    "smollm3-3b-gsm8k": ("HuggingFaceTB/SmolLM3-3B", 12),
    "qwen3-4b-gsm8k": ("Qwen/Qwen3-4B", 12),
    "qwen3-8b-gsm8k": ("Qwen/Qwen3-8B", 16),
    "qwen3-14b-gsm8k": ("Qwen/Qwen3-14B", 24),
    "qwen3-4b-mbpp": ("Qwen/Qwen3-4B", 12),
    # Tools and environments (issue 23).
    "qwen3-1.7b-gsm8k-python": ("Qwen/Qwen3-1.7B", 8),
    "qwen3-4b-gsm8k-python": ("Qwen/Qwen3-4B", 12),
    "qwen3-1.7b-guess-number": ("Qwen/Qwen3-1.7B", 8),
    # Image-text models: diagrams in, LoRA on the language model.
    "qwen2.5-vl-3b-geometry": ("Qwen/Qwen2.5-VL-3B-Instruct", 12),
    "qwen3-vl-8b-geometry": ("Qwen/Qwen3-VL-8B-Instruct", 16),
}
# Thinking models: their template's own thinking is off, so our <think>/<answer> format is used.
# (Qwen3-VL's Instruct checkpoints do not think: the thinking ones are separate checkpoints.)
THINKING = [name for name in EXPECTED if name.startswith(("qwen3-", "smollm3-")) and "-vl-" not in name]


def header_lines(name: str) -> list[str]:
    """The comment block at the top of a preset file."""
    lines = []
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_grpo", *args], capture_output=True,
                          text=True, timeout=120)


def test_all_expected_presets_exist():
    assert set(EXPECTED) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_uses_the_advertised_model(name):
    model, target_gb = EXPECTED[name]
    assert load_config(preset=name).model_name_or_path == model
    target = [line for line in header_lines(name) if line.startswith("# target:")]
    assert target and re.match(rf"# target: {target_gb} GB GPU\b", target[0]), target


@pytest.mark.parametrize("name", PRESETS)
def test_preset_header_says_what_it_is_its_target_and_how_to_run_it(name):
    lines = header_lines(name)
    assert lines and lines[0].startswith(f"# {name}:"), "first line should name the preset"
    assert sum(line.startswith("# target:") for line in lines) == 1
    assert f"# run: lowvram-grpo train --preset {name}" in lines


@pytest.mark.parametrize("name", PRESETS)
def test_preset_only_uses_known_keys_and_every_reward_resolves(name):
    config = load_config(preset=name)  # unknown keys and bad values raise ConfigError
    raw = yaml.safe_load(preset_path(name).read_text(encoding="utf-8"))
    assert set(raw) <= set(config.to_dict())
    for spec in config.rewards:
        assert callable(resolve_reward(spec.name))


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_presets_follow_the_low_memory_recipe(name):
    config = load_config(preset=name)
    assert config.quantization == "nf4"
    assert config.gradient_checkpointing
    assert config.optimizer == "paged_adamw_8bit"
    assert config.num_generations == 8
    assert config.beta == 0.04 and config.loss_type == "dapo"
    # With tools, the chat template lists their schemas in every prompt; an image's vision tokens are
    # part of the prompt (up to 256 at the vision presets' image_size).
    assert config.max_prompt_length == (512 if config.tools or config.environment_factory or config.image_size else 256)
    assert 256 <= config.max_completion_length <= 512
    assert 5e-6 <= config.learning_rate <= 1e-5
    assert 16 <= config.lora_r <= 32
    # A whole number of generation chunks and micro-batches per step, none bigger than the step.
    for size in (config.generation_chunk_size, config.micro_batch_size):
        assert config.sequences_per_step % size == 0
    assert config.output_dir == f"runs/{name}"


@pytest.mark.parametrize("name", GSM8K_PRESETS)
def test_gsm8k_presets_read_gsm8k_and_reward_the_number(name):
    config = load_config(preset=name)
    assert (config.dataset, config.dataset_config, config.dataset_split) == ("openai/gsm8k", "main", "train")
    assert (config.prompt_column, config.answer_column) == ("question", "answer")
    assert "<answer>" in config.system_prompt
    assert config.rewards[0].name == "numeric_answer" and config.rewards[0].weight == 1.0


@pytest.mark.parametrize("name", THINKING)
def test_thinking_model_presets_switch_the_templates_thinking_off(name):
    assert load_config(preset=name).chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize("name", [n for n in EXPECTED if any(line.startswith("# plan:") for line in header_lines(n))])
def test_preset_header_states_the_planners_estimate_offline(name):
    """The header's "plan: ~X GB" is what `plan` computes now, offline, and it fits the target."""
    from lowvram_grpo.planning.planner import plan

    line = next(line for line in header_lines(name) if line.startswith("# plan:"))
    stated = float(re.search(r"~([\d.]+) GB", line).group(1))
    result = plan(load_config(preset=name), EXPECTED[name][1])
    assert result.fits and result.configured.total_bytes <= result.usable_gb * 2**30
    assert stated == pytest.approx(round(result.configured.total_gb, 1), abs=0.051)


@pytest.mark.parametrize("name", ["qwen2.5-1.5b-reasoning-tags", "qwen3-1.7b-reasoning-tags"])
def test_reasoning_tags_preset_uses_the_format_rewards(name):
    config = load_config(preset=name)
    assert {spec.name for spec in config.rewards} == {"format_strict", "format_soft", "tag_count", "numeric_answer"}
    assert "<think>" in config.system_prompt and "<answer>" in config.system_prompt


@pytest.mark.parametrize("name", [name for name in GPU_PRESETS if name not in CODE_PRESETS + ENVIRONMENT_PRESETS])
def test_a_right_answer_outscores_a_well_formatted_wrong_one(name):
    """Format rewards help the model find the answer layout, but must never outweigh correctness."""
    config = load_config(preset=name)
    rewards = load_reward_functions(config.rewards)
    reference = "Natalia sold 48 / 2 = 24 clips in May, 48 + 24 = 72 in all.\n#### 72"
    right_plain = "She sold 48 + 24 = 72 clips. The answer is 72."
    wrong_formatted = "<think>\n48 + 24 = 70\n</think>\n<answer>\n70\n</answer>"
    right_formatted = "<think>\n48 + 24 = 72\n</think>\n<answer>\n72\n</answer>"
    completions = [right_plain, wrong_formatted, right_formatted]
    scores = score_completions(rewards, ["q"] * 3, completions, None, {"answer": [reference] * 3})
    right, wrong, best = scores.total.tolist()
    assert right > wrong
    assert best > right  # the format still earns something on top


@pytest.mark.parametrize("name", PRESETS)
def test_dry_run_of_every_preset(name):
    result = run_cli("train", "--preset", name, "--dry-run")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model_name_or_path"] == load_config(preset=name).model_name_or_path


def test_presets_command_lists_every_preset_with_model_and_target():
    result = run_cli("presets")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in PRESETS:
        row = next((line for line in lines if line.split()[0] == name), None)
        assert row is not None, f"{name} missing from:\n{result.stdout}"
        assert load_config(preset=name).model_name_or_path in row
        target = next(line for line in header_lines(name) if line.startswith("# target:"))
        assert target.split(":", 1)[1].strip() in row
