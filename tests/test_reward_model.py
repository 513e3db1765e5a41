"""`model:<dir>` rewards: a tiny sequence classifier the test builds, scored as TRL scores it."""

from __future__ import annotations

import json

import pytest
import torch

from lowvram_grpo.config import TrainConfig, load_config
from lowvram_grpo.planning.memory import estimate_memory
from lowvram_grpo.planning.model_shape import resolve_model_config
from lowvram_grpo.planning.planner import format_plan, plan
from lowvram_grpo.rewards.base import RewardContext, RewardFunctionError
from lowvram_grpo.rewards.loading import load_reward_functions, resolve_reward


def build_classifier(path, num_labels: int = 1, chat_template: bool = True) -> str:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from lowvram_grpo.builtin.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():  # a visible spread of scores
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("rm") / "tiny-rm")


def trl_scores(path: str, prompts: list, completions: list) -> list[float]:
    """What TRL 1.16's GRPOTrainer computes for a reward model (_calculate_rewards): chat
    template for conversational input, else prompt + completion; right-padded, no special tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    texts = []
    for p, c in zip(prompts, completions):
        if isinstance(p, list):
            texts.append(tokenizer.apply_chat_template(p + c, tokenize=False))
        else:
            texts.append(p + c)
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits[:, 0].tolist()


def test_scores_match_trls_reward_model_scoring(tmp_path):
    path = build_classifier(tmp_path / "plain-rm", chat_template=False)
    prompts = ["1+2=", "3+4=", "9+9=", "1+2="]
    completions = ["3", "77", "18", "3+3+3"]
    got = resolve_reward(f"model:{path}")(prompts=prompts, completions=completions)
    assert got == pytest.approx(trl_scores(path, prompts, completions), abs=1e-5)
    assert len({round(x, 4) for x in got}) > 1  # the model really tells them apart


def test_conversational_prompts_go_through_the_chat_template(classifier):
    prompts = [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "5+5="}]]
    completions = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "10"}]]
    got = resolve_reward(f"model:{classifier}")(prompts=prompts, completions=completions)
    assert got == pytest.approx(trl_scores(classifier, prompts, completions), abs=1e-5)


def test_batches_do_not_change_the_scores(classifier):
    config = TrainConfig(reward_model_batch_size=1)
    prompts, completions = ["1+2=", "3+4=", "9+9="], ["3", "7777777", "1"]
    one = resolve_reward(f"model:{classifier}", RewardContext(config))(prompts=prompts, completions=completions)
    three = resolve_reward(f"model:{classifier}")(prompts=prompts, completions=completions)
    assert one == pytest.approx(three, abs=1e-5)


def test_metric_name_is_the_model_folder(classifier):
    (loaded,) = load_reward_functions(load_config(overrides={"rewards": [f"model:{classifier}"]}).rewards)
    assert loaded.name == "model_tiny-rm"


def test_a_classifier_with_several_labels_is_refused(tmp_path):
    path = build_classifier(tmp_path / "two-labels", num_labels=2)
    with pytest.raises(RewardFunctionError, match="num_labels=1"):
        resolve_reward(f"model:{path}")(prompts=["1+1="], completions=["2"])


def test_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(RewardFunctionError, match="could not be loaded"):
        resolve_reward(f"model:{tmp_path / 'nothing-here'}")(prompts=["1"], completions=["2"])


def test_the_models_own_code_never_runs_unless_the_config_says_so(tmp_path, classifier):
    import shutil

    path = tmp_path / "custom-rm"
    shutil.copytree(classifier, path)
    marker = tmp_path / "custom-code-ran"
    (path / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "from transformers import Qwen2ForSequenceClassification as CustomModel\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "custom_model.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    try:
        resolve_reward(f"model:{path}")(prompts=["1+1="], completions=["2"])
    except RewardFunctionError as err:
        assert "reward_model_trust_remote_code" in str(err)
    assert not marker.exists()


def test_the_planner_counts_the_reward_model(classifier):
    base = load_config(preset="tiny-cpu")
    with_rm = load_config(preset="tiny-cpu", overrides={"rewards": ["arith_answer", f"model:{classifier}"]})
    model_config = resolve_model_config(base.model_name_or_path)
    without, with_model = estimate_memory(model_config, base), estimate_memory(model_config, with_rm)
    weights = [v for k, v in with_model.parts.items() if k.startswith("reward model tiny-rm weights")]
    rm = resolve_model_config(classifier)
    # Qwen2 tiny classifier: every parameter except the (absent) LM head, at 4-bit linears.
    linear = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    rest = rm["vocab_size"] * 64 + 2 * (64 + 32 + 32 + 2 * 64) + 64 + 64
    assert weights and weights[0] == pytest.approx(round(linear * 0.516) + rest * 2, rel=0.01)
    assert "reward model" in with_model.phases
    assert with_model.static_bytes > without.static_bytes
    assert "reward model tiny-rm" in format_plan(plan(with_rm, vram_gb=8))


def test_training_with_a_reward_model_and_the_self_judge(tiny_cache, tmp_path, classifier):
    """The trainer hands the new kinds their settings and its policy: one step logs both."""
    from lowvram_grpo.trainer import train

    config = load_config(preset="tiny-cpu", overrides={
        "output_dir": str(tmp_path / "run"), "max_steps": 1, "save_every": 100,
        "rewards": ["arith_answer", {"name": f"model:{classifier}", "weight": 0.1}, "judge:self"],
        "judge_template": "{prompt}", "judge_max_tokens": 2})
    records = []
    train(config, progress=False, on_step=records.append)
    (record,) = records
    assert {"rewards/model_tiny-rm/mean", "rewards/arith_answer/mean"} <= set(record)
    # The tiny model's answers to "a+b=" are numbers, not always within 0-10: judged or counted.
    assert "rewards/judge_self/mean" in record or record["rewards/judge_self/none_frac"] == 1.0
