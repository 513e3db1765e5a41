"""lowvram-grpo: GRPO fine-tuning on one consumer GPU (4-bit base, LoRA, adapter-off reference).

The public API, shared by the CLI, the Gradio app and the notebook:

    import lowvram_grpo as lg
    config = lg.load_config(preset="tiny-cpu", overrides={"max_steps": 20})
    result = lg.train(config, on_step=lambda record: print(record["reward"]))
    print(result.state, result.adapter)   # "finished", runs/.../final

Names are imported on first use, so `import lowvram_grpo` (and the CLI's start-up) stays fast
and does not pull in torch until something needs it.
"""

from lowvram_grpo.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "config", "RewardSpec": "config", "ConfigError": "config",
    "load_config": "config", "list_presets": "config",
    "load_prompt_data": "data", "preview": "data", "DatasetError": "data",
    "BUILTIN_REWARDS": "rewards", "register_reward": "rewards", "RewardFunctionError": "rewards",
    "completion_text": "rewards",
    "REWARD_KINDS": "rewards", "resolve_reward": "rewards", "RewardContext": "rewards",
    "load_policy": "model", "reference_model": "model",
    "train": "trainer", "TrainResult": "rundir", "RunDir": "rundir",
    "generate_greedy": "rollout", "model_prompt": "vision",
    "evaluate": "evaluate", "compare": "evaluate", "format_comparison": "evaluate",
    "merge_adapter": "export",
    "estimate_memory": "planning.memory", "plan": "planning.planner", "format_plan": "planning.planner",
    "read_jsonl": "rundir", "read_status": "rundir",
}

__all__ = sorted(_EXPORTS)
lazy_exports(__name__, _EXPORTS)
