"""Reward functions: what they share (base), the built-ins and their registry (builtins), code
execution in a sandbox (code, sandbox), LLM judges (judges), reward models (reward_model),
names in the config resolved to functions (loading) and a batch scored (scoring).

The names a reward-function author uses can be imported from here. They are imported on
first use, as in the package root, so that importing one submodule (the sandbox, say) does
not pull in the others.
"""

from lowvram_grpo.lazy import lazy_exports

_EXPORTS = {
    "RewardContext": "base", "RewardFunction": "base", "RewardFunctionError": "base",
    "TRAINER_KEYWORDS": "base", "completion_text": "base",
    "BUILTIN_REWARDS": "builtins", "register_reward": "builtins", "after_thinking": "builtins",
    "extract_answer": "builtins", "extract_number": "builtins",
    "REWARD_KINDS": "loading", "load_reward_functions": "loading", "resolve_reward": "loading",
}

__all__ = sorted(_EXPORTS)
lazy_exports(__name__, _EXPORTS)
