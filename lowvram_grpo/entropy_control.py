"""The entropy bonus's coefficient, fixed or adaptive, exactly as TRL 1.16's GRPOTrainer sets it.

The loss subtracts `coef * mean token entropy` (see `grpo.grpo_loss`). With a fixed
`entropy_coef` that is the whole story. With `use_adaptive_entropy` (Skywork-OR1) the
coefficient follows the policy's entropy instead: after every optimizer step it moves up by
`entropy_coef_delta` if that step's entropy was at or below `entropy_target` and down otherwise,
within [`entropy_coef_min`, `entropy_coef_max`], and the bonus is only applied while the last
measured entropy is at or below the target. So it stays out of the way while the policy explores,
and pushes back, harder each step, once the entropy collapses.

The entropy measured is the token-weighted mean over the whole optimizer step, on every process
together, over the tokens the policy loss trains on (all completion tokens, or the high-entropy
ones with `top_entropy_quantile < 1`). The coefficient applied during a step is the one set at the
end of the previous step, so every micro-batch of a step uses the same. The state (coefficient and
last entropy) is part of the checkpoint, so a resumed run continues the same trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EntropyControl:
    coef: float  # entropy_coef: fixed, or the adaptive controller's current value
    adaptive: bool = False  # use_adaptive_entropy
    target: float = 0.2  # entropy_target (nats)
    delta: float = 0.005  # entropy_coef_delta
    coef_min: float = 0.0  # entropy_coef_min
    coef_max: float = 1.0  # entropy_coef_max
    # The entropy of the last optimizer step; infinite before the first, so that the first step
    # applies no bonus until a real measurement arrives (as TRL).
    last_world_entropy: float = math.inf

    @classmethod
    def from_config(cls, config) -> EntropyControl:
        return cls(coef=config.entropy_coef, adaptive=config.use_adaptive_entropy, target=config.entropy_target,
                   delta=config.entropy_coef_delta, coef_min=config.entropy_coef_min,
                   coef_max=config.entropy_coef_max)

    @property
    def enabled(self) -> bool:
        """Whether there is an entropy bonus at all (adaptive: always, as it may come back from 0)."""
        return self.adaptive or self.coef != 0.0

    def applied_coef(self) -> float:
        """The coefficient of this optimizer step's entropy bonus."""
        if not self.adaptive:
            return self.coef
        return self.coef if self.last_world_entropy <= self.target else 0.0

    def update(self, world_entropy: float) -> None:
        """After an optimizer step whose mean entropy (over every process) was `world_entropy`."""
        if not self.adaptive:
            return
        if world_entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_world_entropy = world_entropy

    def state_dict(self) -> dict[str, float]:
        """For checkpoints (TRL's names, as in its entropy_ctrl_state.json)."""
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_world_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.last_world_entropy = state["entropy_coef"], state["last_world_entropy"]
