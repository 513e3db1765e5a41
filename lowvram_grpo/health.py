"""Run health: warnings when training goes wrong, each naming the metric that triggered it.

The same checks feed the app's page (over metrics.jsonl and completions.jsonl) and the CLI
log (`HealthMonitor`, fed step by step by the trainer). Most compare the recent steps with the
first ones, the KL check with the steps just before, so they need some history and say nothing
before that. Their thresholds are set against healthy runs (tests/data holds two of the tiny-cpu
demo's): noise that a healthy run shows, such as one step's jump in the KL estimate, is no
warning.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

MIN_STEPS = 8  # history needed before comparing "recent" with "early"
WINDOW = 10  # steps in each of the early and recent windows (fewer for short runs)
RISE = 0.25  # a reward that gained this much from the early to the recent window is rising
ZERO_STD_SHARE = 0.8  # this share of zero-std groups leaves little learning signal

# KL spikes. A single step's KL says little: the k3 estimate averages exp(d) - d - 1 over the
# sampled tokens, so one token the base model likes far more than the policy makes it jump
# (the healthy tiny-cpu demo has a step in eight at 3-20x the median, back down the next step,
# sometimes two in a row). A spike worth a warning holds: the median of the last KL_RECENT
# steps (so at least 4 of the 7) is above the baseline, the KL_BASELINE steps before them, by
# KL_SIGMAS robust standard deviations (1.4826 x the median absolute deviation) and KL_FACTOR
# times its median, and above KL_FLOOR. The baseline needs KL_MIN_BASELINE steps: the first
# steps are KL's rise from 0 (the policy starts as the base model), not a level. On four seeds
# of the demo the recent median stays below 0.4x this limit.
KL_RECENT = 7
KL_BASELINE = 20
KL_MIN_BASELINE = 10
KL_SIGMAS = 6
KL_FACTOR = 4
KL_FLOOR = 0.05


@dataclass(frozen=True)
class HealthWarning:
    kind: str  # one per problem: a run reports each kind once
    metric: str  # the metric that triggered it
    step: int
    message: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.message} [{self.metric}]"


def _values(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if isinstance(r.get(key), (int, float)) and r[key] == r[key]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def repetition(text: str, n: int = 3) -> float:
    """Share of repeated word n-grams in a text: 0 for none, towards 1 for a loop."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if len(grams) >= 4 else 0.0


def check_health(records: list[dict], samples: list[dict] | None = None) -> list[HealthWarning]:
    """Every problem the recent steps show (see the module doc)."""
    if len(records) < MIN_STEPS:
        return []
    window = min(WINDOW, len(records) // 2)
    early, recent = records[:window], records[-window:]
    step = int(records[-1].get("step", len(records)))
    found = []

    lengths_early = _values(early, "completions/mean_length")
    lengths_recent = _values(recent, "completions/mean_length")
    if lengths_early and lengths_recent:
        before, now = _mean(lengths_early), _mean(lengths_recent)
        clipped = _values(recent, "completions/clipped_ratio")
        if now >= 2 * before and clipped and _mean(clipped) >= 0.5:
            found.append(HealthWarning(
                "length-blowup", "completions/mean_length", step,
                f"completion length blowing up: {before:.0f} -> {now:.0f} tokens, {_mean(clipped):.0%} cut at "
                "max_completion_length (lower the learning rate or add a length penalty)"))
        elif before >= 8 and now <= 0.3 * before:
            found.append(HealthWarning(
                "length-collapse", "completions/mean_length", step,
                f"completion length collapsing: {before:.0f} -> {now:.0f} tokens (a reward may favour empty "
                "answers)"))

    # A group whose completions all got the same reward is all right or all wrong. Once the
    # reward has climbed they are mostly all right: the task is being learned (the healthy demo
    # ends with most of its groups solved), which is no warning.
    zero_std = _values(recent, "frac_reward_zero_std")
    reward_early, reward_recent = _values(early, "reward"), _values(recent, "reward")
    learned = bool(reward_early and reward_recent) and _mean(reward_recent) >= _mean(reward_early) + RISE
    if zero_std and _mean(zero_std) >= ZERO_STD_SHARE and not learned:
        found.append(HealthWarning(
            "zero-std", "frac_reward_zero_std", step,
            f"{_mean(zero_std):.0%} of groups got the same reward for every completion: no learning signal "
            "(if all wrong, make the task easier or the reward finer; if all right, use harder prompts; or "
            "raise num_generations)"))

    spike = _kl_spike(_values(records, "kl"))
    if spike:
        level, typical = spike
        found.append(HealthWarning(
            "kl-spike", "kl", step,
            f"KL to the base model jumped to {level:.3g} (median of the last {KL_RECENT} steps; {typical:.3g} "
            "before) and stays there: lower the learning rate or raise beta"))

    # Reward hacking is judged on full windows: in the first steps the easiest reward rising
    # first is how learning starts. A function that gave every completion so far the same value
    # (never or always satisfied, e.g. a format the model never writes) is not "flat while the
    # other rises": it gives no signal at all, whatever the policy learns.
    functions = sorted({k for r in early + recent for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    change = {}
    for key in functions if len(records) >= 2 * WINDOW else []:
        before, now = _values(early, key), _values(recent, key)
        if before and now:
            change[key] = _mean(now) - _mean(before)
    rising = [k for k, d in change.items() if d >= RISE]
    flat = [k for k, d in change.items() if abs(d) < 0.05 and len(set(_values(records, k))) > 1]
    if rising and flat:
        found.append(HealthWarning(
            "reward-hacking", rising[0], step,
            f"{rising[0]} is rising (+{change[rising[0]]:.2f}) while {flat[0]} stays flat: the policy may be "
            "learning the easy reward only (reward hacking?); check the completions"))

    if samples:
        by_step: dict[int, list[float]] = {}
        for s in samples:
            by_step.setdefault(int(s.get("step") or 0), []).append(repetition(str(s.get("completion", ""))))
        steps = sorted(by_step)
        if len(steps) >= 4:
            half = len(steps) // 2
            before = _mean([v for s in steps[:half] for v in by_step[s]])
            now = _mean([v for s in steps[-half:] for v in by_step[s]])
            if now >= 0.3 and now >= before + 0.2:
                found.append(HealthWarning(
                    "repetition", "completions (repeated 3-grams)", step,
                    f"completions repeat themselves more and more: {before:.0%} -> {now:.0%} repeated 3-grams "
                    "(add a repetition penalty reward, or lower the learning rate)"))
    return found


def _kl_spike(kl: list[float]) -> tuple[float, float] | None:
    """(recent level, typical level) when the KL has jumped and stays up (see KL_RECENT)."""
    recent, before = kl[-KL_RECENT:], kl[-KL_RECENT - KL_BASELINE:-KL_RECENT]
    if len(before) < KL_MIN_BASELINE:
        return None
    typical = statistics.median(before)
    spread = 1.4826 * statistics.median(abs(v - typical) for v in before)
    level = statistics.median(recent)
    if level > max(typical + KL_SIGMAS * spread, KL_FACTOR * typical, KL_FLOOR):
        return level, typical
    return None


class HealthMonitor:
    """Step-by-step health checks for the CLI log: each kind of warning once per run."""

    def __init__(self, records: list[dict[str, Any]] | None = None):
        self.records = list(records or [])
        self.samples: list[dict[str, Any]] = []
        self.reported: set[str] = set()

    def update(self, record: dict[str, Any], samples: list[dict[str, Any]]) -> list[HealthWarning]:
        self.records.append(record)
        self.samples.extend(samples)
        new = [w for w in check_health(self.records, self.samples) if w.kind not in self.reported]
        self.reported.update(w.kind for w in new)
        return new
