"""An example environment (`environment_factory`): guess a secret number, told higher or lower.

One instance per rollout (TRL's convention): `reset(**row)` starts an episode for a dataset row
(`builtin:guess-number`, one secret per row) and returns text for the prompt (None here: the
prompt says it all); the public method `guess` is the model's tool; `get_reward` scores the
episode (logged as the reward `GuessNumber`). Write your own the same way (README: "Tools and
environments"): plain methods with type hints and Google-style docstrings, state on `self`.
"""

from __future__ import annotations

import random

LOW, HIGH = 1, 100


class GuessNumber:
    """A number-guessing game: each guess is answered "higher", "lower" or "correct"."""

    def reset(self, secret: int, **row) -> str | None:
        self.secret, self.guesses, self.solved = int(secret), 0, False
        return None

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: Your guess, a whole number from 1 to 100.
        """
        if self.solved:
            return "already solved"
        self.guesses += 1
        if int(number) == self.secret:
            self.solved = True
            return "correct"
        return "higher" if int(number) < self.secret else "lower"

    def get_reward(self) -> float:
        """1 for solving it in one guess, 0.1 less for each further guess (at least 0.1); 0 unsolved."""
        return max(1.0 - 0.1 * (self.guesses - 1), 0.1) if self.solved else 0.0


def guess_number_rows(num_rows: int = 1000, seed: int = 0) -> list[dict]:
    """Conversational prompts, each with its own secret (the column reset() reads)."""
    rng = random.Random(seed)
    prompt = (f"I am thinking of a whole number from {LOW} to {HIGH}. Find it with the guess tool: after each "
              "guess I say higher, lower or correct. Use as few guesses as you can.")
    return [{"prompt": [{"role": "user", "content": prompt}], "secret": rng.randint(LOW, HIGH)}
            for _ in range(num_rows)]
