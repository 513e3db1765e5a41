"""Configuration: precedence, aliases, types, and one clear error per bad input."""

import pytest

from lowvram_grpo.config import ConfigError, TrainConfig, load_config, parse_overrides


def test_precedence_defaults_then_preset_then_overrides(tmp_path):
    assert TrainConfig().num_generations == 8  # default
    preset = load_config(preset="tiny-cpu")
    assert preset.max_steps == 60  # from the preset file
    overridden = load_config(preset="tiny-cpu", overrides=["max_steps=5", "lr=2e-5", "G=4"])
    assert (overridden.max_steps, overridden.learning_rate, overridden.num_generations) == (5, 2e-5, 4)

    config_file = tmp_path / "my.yaml"
    config_file.write_text("max_steps: 7\nrewards: [arith_answer]\n")
    from_file = load_config(config_path=config_file, overrides={"beta": 0.0})
    assert (from_file.max_steps, from_file.beta, from_file.rewards[0].name) == (7, 0.0, "arith_answer")


def test_override_values_are_parsed_as_yaml():
    parsed = parse_overrides(["lora_target_modules=[q_proj, v_proj]", "adapter_path=null", "seed=3"])
    assert parsed == {"lora_target_modules": ["q_proj", "v_proj"], "adapter_path": None, "seed": 3}
    config = load_config(overrides=["lora_target_modules=[q_proj, v_proj]", "learning_rate=1e-5"])
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.learning_rate == 1e-5  # YAML reads "1e-5" as a string; it is still a number here


def test_rewards_accept_names_and_weights():
    config = load_config(overrides={"rewards": ["arith_answer", {"name": "format_soft", "weight": 0.5}]})
    assert [(r.name, r.weight) for r in config.rewards] == [("arith_answer", 1.0), ("format_soft", 0.5)]


@pytest.mark.parametrize("overrides, message", [
    (["lrr=1e-5"], "lrr: unknown config key. Did you mean 'lr'?"),
    (["num_generations=1"], "num_generations: GRPO compares completions within a group"),
    (["num_generations=two"], "num_generations: expected a whole number"),
    (["beta=-1"], "beta: must be >= 0"),
    (["loss_type=ppo"], "loss_type: must be one of grpo, dr_grpo, dapo, bnpo, cispo, sapo, luspo, vespo"),
    (["loss_type=cispo"], "epsilon_high: with loss_type=cispo it caps the ratio itself, so it must be >= 1"),
    (["delta=1.1"], "delta: caps the ratio above the clip range, so it must be > 1 + epsilon_high = 1.2"),
    (["top_entropy_quantile=1.5"], "top_entropy_quantile: must be in [0, 1]"),
    (["importance_sampling_level=seq"], "importance_sampling_level: must be one of token, sequence"),
    (["zero_std_groups=drop"], "zero_std_groups: must be one of keep, skip, resample"),
    (["off_policy_mask_threshold=0"], "off_policy_mask_threshold: must be > 0"),
    (["entropy_coef_min=-0.1"], "entropy_coef_min: must be >= 0"),
    (["entropy_coef_min=0.5", "entropy_coef_max=0.2"], "entropy_coef_max: must be >= entropy_coef_min = 0.5"),
    (["entropy_coef_delta=0"], "entropy_coef_delta: must be > 0"),
    (["entropy_target=-1"], "entropy_target: must be >= 0 nats"),
    (["use_adaptive_entropy=true", "entropy_coef=2"],
     "entropy_coef: with use_adaptive_entropy it is the starting coefficient, so it must be within "
     "[entropy_coef_min, entropy_coef_max] = [0, 1], got 2.0"),
    (["quantization=int8"], "quantization: must be one of nf4, none"),
    (["temperature=0"], "temperature: must be > 0"),
    (["gradient_checkpointing=maybe"], "gradient_checkpointing: expected true or false"),
    (["max_steps"], "override 'max_steps': expected key=value"),
    (["rewards=[]"], "rewards: at least one reward function is needed"),
    (["report_to=[mlflow]"], "report_to: must be one of tensorboard, wandb, trackio"),
    (["top_p=1.5"], "top_p: must be in (0, 1]"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny-cpu", overrides=overrides)
    assert message in str(err.value)


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="no preset named 'tiny-gpu'. Did you mean 'tiny-cpu'"):
        load_config(preset="tiny-gpu")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(config_path=tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_path=broken)
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(config_path=a_list)


# The objective's keys are GRPOConfig's, with its defaults, so a TRL config's values mean the same here.
TRL_OBJECTIVE_KEYS = ("loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level", "scale_rewards",
                      "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                      "vespo_lambda_neg", "mask_truncated_completions", "top_entropy_quantile", "entropy_coef",
                      "off_policy_mask_threshold", "use_bias_correction_kl", "multi_objective_aggregation",
                      "num_iterations", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max",
                      "entropy_coef_delta", "entropy_target")


def test_objective_keys_and_defaults_are_trls():
    import dataclasses

    from trl import GRPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = load_config()
    for key in TRL_OBJECTIVE_KEYS:
        assert getattr(ours, key) == trl_defaults[key], key
