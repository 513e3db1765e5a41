"""Evaluation (greedy, adapter on/off) and export (merging the adapter into a 16-bit base).

No training: the tiny model gets a LoRA adapter whose B matrices are set to random values, so
the adapter really changes the model's outputs, and that is what eval and export must carry.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lowvram_grpo.builtin import arith
from lowvram_grpo.cli import main
from lowvram_grpo.config import RewardSpec, load_config
from lowvram_grpo.evaluate import compare, evaluate, format_comparison
from lowvram_grpo.export import ExportError, merge_adapter
from lowvram_grpo.model import load_policy, reference_model
from lowvram_grpo.rewards.base import RewardFunction
from lowvram_grpo.rewards.builtins import tag_count
from lowvram_grpo.rewards.loading import load_reward_functions

ROWS = arith.all_arith_rows()[::7]  # 15 distinct problems


@pytest.fixture(scope="module")
def setup(tiny_cache, tmp_path_factory):
    """(policy, tokenizer, config, adapter_dir): a full-precision tiny policy with a saved adapter."""
    config = load_config(preset="tiny-cpu", overrides={"quantization": "none", "dtype": "float32"})
    policy, tokenizer = load_policy(config, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # B = 0 at init would make the adapter a no-op
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter_dir = tmp_path_factory.mktemp("adapter") / "final"
    policy.save_pretrained(adapter_dir)
    policy.eval()
    return policy, tokenizer, config, adapter_dir


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["3+5=8", "9+9=18", "0+7=7"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[tuple[str, int, bool]]:
    """Plain transformers greedy decoding, one prompt at a time: the independent reference.
    Per prompt: the completion, its length in tokens (the EOS counted, as TRL counts it), and
    whether max_new_tokens cut it off (no EOS at its end)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].size(1):]
        out.append((tokenizer.decode(generated, skip_special_tokens=True), len(generated),
                    int(generated[-1]) not in eos))
    return out


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    return [text for text, _, _ in greedy_generations(model, tokenizer, prompts, max_new_tokens)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # One thread: see conftest.py (the tiny model's matrices are too small to share out).
    return subprocess.run([sys.executable, "-m", "lowvram_grpo", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- evaluate ----------------------------------------------------------------------------------


def test_evaluate_base_and_adapter_score_their_own_greedy_completions(setup, tiny_path):
    policy, tokenizer, config, _ = setup
    rewards = load_reward_functions(config.rewards)
    prompts = [row["prompt"] for row in ROWS]
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)

    for adapter, model in ((False, base), (True, policy)):
        metrics = evaluate(policy, tokenizer, ROWS, rewards, config, adapter=adapter)
        generations = greedy_generations(model, tokenizer, prompts, config.max_completion_length)
        completions, lengths, clipped = zip(*generations)
        right = [c.strip() == row["answer"] for c, row in zip(completions, ROWS)]
        assert metrics["eval/accuracy"] == pytest.approx(sum(right) / len(ROWS))
        assert metrics["eval/reward"] == pytest.approx(sum(right) / len(ROWS))
        assert metrics["eval/rewards/arith_answer/mean"] == pytest.approx(sum(right) / len(ROWS))
        assert metrics["eval/num_prompts"] == len(ROWS)
        assert metrics["eval/completions/mean_length"] == pytest.approx(sum(lengths) / len(ROWS))
        assert metrics["eval/completions/clipped_ratio"] == pytest.approx(sum(clipped) / len(ROWS))


def test_evaluate_leaves_the_policy_as_it_found_it(setup):
    policy, tokenizer, config, _ = setup
    before = logits(policy, tokenizer)
    for mode in (True, False):
        policy.train(mode)
        evaluate(policy, tokenizer, ROWS[:3], None, config, adapter=False)
        assert policy.training is mode
    policy.eval()
    # Still the adapter's outputs: the adapter was switched back on after the base-model pass.
    assert torch.allclose(logits(policy, tokenizer), before)


def test_evaluate_max_prompts_and_accuracy_only_for_answer_rewards(setup):
    policy, tokenizer, config, _ = setup
    no_answer_reward = [RewardFunction("tag_count", tag_count, 1.0)]
    metrics = evaluate(policy, tokenizer, ROWS, no_answer_reward, config, max_prompts=4)
    assert metrics["eval/num_prompts"] == 4
    assert "eval/accuracy" not in metrics  # no notion of a right answer: not guessed
    assert metrics["eval/reward"] == metrics["eval/rewards/tag_count/mean"] == 0.0


def test_accuracy_leaves_out_rows_the_answer_reward_does_not_apply_to(setup):
    policy, tokenizer, config, _ = setup
    rewards = load_reward_functions([RewardSpec("exact_answer")])
    completions = greedy_completions(policy, tokenizer, [r["prompt"] for r in ROWS[:6]], config.max_completion_length)
    # Rows 0-2 have the completion itself as reference (right), rows 3-5 have no reference.
    rows = [{"prompt": r["prompt"], "answer": c if i < 3 else None}
            for i, (r, c) in enumerate(zip(ROWS[:6], completions))]
    assert evaluate(policy, tokenizer, rows, rewards, config)["eval/accuracy"] == 1.0


def test_format_comparison_has_metric_base_adapter_delta():
    table = format_comparison({"eval/reward": 0.25, "eval/num_prompts": 8.0},
                              {"eval/reward": 0.75, "eval/num_prompts": 8.0})
    header, row = table.splitlines()
    assert header.split() == ["metric", "base", "adapter", "delta"]
    assert row.split() == ["reward", "0.2500", "0.7500", "+0.5000"]


def test_compare_uses_the_held_out_split(setup):
    _, _, _, adapter_dir = setup
    config = load_config(preset="tiny-cpu", overrides={"eval_fraction": 0.01})  # 10 of 1000 rows
    messages, examples = [], []
    before, after = compare(config, adapter_dir, log=messages.append, examples=examples)
    assert before["eval/num_prompts"] == after["eval/num_prompts"] == 10
    assert set(before) == set(after) and "eval/accuracy" in after
    assert any("held-out" in m for m in messages)
    # The adapter changes the greedy completions, so the two passes really differ.
    assert before != after
    # The examples are the evaluated prompts with both greedy answers, which the metrics score.
    assert len(examples) == 10 and [e["base"] for e in examples] != [e["adapter"] for e in examples]
    for key, metrics in (("base", before), ("adapter", after)):
        right = [e[key].strip() == e["answer"] for e in examples]
        assert metrics["eval/accuracy"] == pytest.approx(sum(right) / 10)


# The eval CLI runs in-process (main() is what the console script calls): a subprocess would
# spend most of its time importing torch again.


def test_eval_cli_prints_the_comparison(setup, capsys):
    _, _, _, adapter_dir = setup
    assert main(["eval", "--preset", "tiny-cpu", "--adapter", str(adapter_dir), "--max-prompts", "6"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "base", "adapter", "delta"]
    assert any(line.startswith("accuracy ") for line in lines)
    assert "6 held-out prompts" in err and "builtin:arith (its test split" in err  # the demo task's own split


def test_eval_without_an_eval_split_says_it_uses_training_prompts(setup, tmp_path, capsys):
    _, _, _, adapter_dir = setup
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in arith.arith_rows(20, seed=3)))
    assert main(["eval", "--preset", "tiny-cpu", "--adapter", str(adapter_dir), "--max-prompts", "4",
                 f"dataset={data}"]) == 0
    assert "no eval split" in capsys.readouterr().err  # falls back to training prompts, and says so


def test_eval_cli_missing_adapter_is_one_line_error(tmp_path, capsys):
    assert main(["eval", "--preset", "tiny-cpu", "--adapter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


# --- export ------------------------------------------------------------------------------------


def test_merged_model_computes_what_base_plus_adapter_computes(setup, tmp_path, tiny_path):
    policy, tokenizer, _, adapter_dir = setup
    out = merge_adapter(adapter_dir, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain model now

    expected = logits(policy, tokenizer)
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)
    with reference_model(policy):
        base = logits(policy, tokenizer)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so the check above means something
    assert (out / "tokenizer.json").is_file()


def test_export_refuses_to_overwrite_unless_asked(setup, tmp_path):
    _, _, _, adapter_dir = setup
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite"):
        merge_adapter(adapter_dir, out, dtype="float32")
    assert (out / "keep.txt").read_text() == "mine"

    merge_adapter(adapter_dir, out, dtype="float32", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary directories left

    with pytest.raises(ExportError, match="contains the adapter"):
        merge_adapter(adapter_dir, adapter_dir.parent, overwrite=True)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "other")


def test_export_cli_writes_float16_and_prints_the_gguf_hint(setup, tmp_path):
    _, _, _, adapter_dir = setup
    out = tmp_path / "merged"
    result = run_cli("export", "--adapter", str(adapter_dir), "--merge", str(out))
    assert result.returncode == 0, result.stderr
    assert "convert_hf_to_gguf.py" in result.stdout and str(out) in result.stdout
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"



def test_export_cli_refusal_is_one_line_error(setup, tmp_path, capsys):
    _, _, _, adapter_dir = setup
    (tmp_path / "taken.txt").write_text("x")
    assert main(["export", "--adapter", str(adapter_dir), "--merge", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
