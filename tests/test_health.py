"""Run health (lowvram_grpo/health.py): the rules that warn about a run going wrong, on the
metrics and completions of real tiny-cpu runs, as the page shows them (`check_health`) and as
the CLI log writes them (`HealthMonitor`, each warning once)."""

import statistics
from pathlib import Path

import pytest

from lowvram_grpo import health, rundir

HEALTHY = Path(__file__).parent / "data"


def healthy_run(name: str = "healthy") -> tuple[list[dict], list[dict]]:
    """The metrics and logged completions of a healthy run of `lowvram-grpo train --preset
    tiny-cpu` (60 steps), keeping only the keys the health checks read. "healthy": on a tiny
    model built on 2 threads (before tiny v3), the reward climbs from 0.17 to about 0.6.
    "solved": the demo as it is, the reward climbs from 0.34 to 0.96, and from step 26 on most
    groups are solved (zero reward std). Both have single-step KL jumps to 10-100x its median,
    as k3 estimates do."""
    return (rundir.read_jsonl(HEALTHY / f"{name}_tiny_cpu_metrics.jsonl"),
            rundir.read_jsonl(HEALTHY / f"{name}_tiny_cpu_completions.jsonl"))


@pytest.mark.parametrize("name", ["healthy", "solved"])
def test_a_healthy_run_gets_no_health_warning(name):
    records, samples = healthy_run(name)
    assert max(r["kl"] for r in records) > 10 * statistics.median(r["kl"] for r in records)
    monitor = health.HealthMonitor()  # the CLI log's checks, step by step
    assert [w for r in records for w in monitor.update(r, [s for s in samples if s["step"] == r["step"]])] == []
    for n in range(1, len(records) + 1):  # the page's checks, at every step
        assert health.check_health(records[:n], [s for s in samples if s["step"] <= n]) == [], n
    # A second reward that no completion ever satisfies (a format the tiny model never writes)
    # is not "flat while the other rises": no reward-hacking warning.
    with_format = [{**r, "rewards/format_strict/mean": 0.0} for r in records]
    assert health.check_health(with_format, samples) == []


def _last(records: list[dict], steps: int, **changes) -> list[dict]:
    """`records` with `changes` (key -> function of the old value) in the last `steps` records."""
    return records[:-steps] + [{**r, **{k: f(r.get(k)) for k, f in changes.items()}} for r in records[-steps:]]


def _unhealthy(kind: str) -> tuple[list[dict], list[dict]]:
    """The healthy run with one thing gone wrong in its last steps."""
    records, samples = healthy_run()
    if kind == "kl-spike":  # KL ten times higher for seven steps
        return _last(records, 7, kl=lambda v: 10 * v), samples
    if kind == "zero-std":  # nearly every group all wrong, the reward back where it started
        return _last(records, 10, frac_reward_zero_std=lambda v: 0.9, reward=lambda v: 0.2), samples
    if kind == "length-blowup":  # longer and longer, most cut at max_completion_length
        return _last(records, 10, **{"completions/mean_length": lambda v: 3 * v,
                                     "completions/clipped_ratio": lambda v: 0.8}), samples
    if kind == "length-collapse":  # answers of 30 tokens down to 6
        longer = [{**r, "completions/mean_length": 10 * r["completions/mean_length"]} for r in records]
        return _last(longer, 10, **{"completions/mean_length": lambda v: v / 5}), samples
    if kind == "reward-hacking":  # a format reward climbs while the answer reward stays put
        hacked = [{**r, "rewards/format/mean": r["step"] / 60, "rewards/arith_answer/mean": 0.3 + 0.02 * (-1) ** i}
                  for i, r in enumerate(records)]
        return hacked, samples
    if kind == "repetition":  # the last logged completions loop
        return records, [{**s, "completion": "so the sum is " * 8} if s["step"] > 30 else s for s in samples]
    raise ValueError(kind)


@pytest.mark.parametrize("kind, metric", [
    ("kl-spike", "kl"), ("zero-std", "frac_reward_zero_std"), ("length-blowup", "completions/mean_length"),
    ("length-collapse", "completions/mean_length"), ("reward-hacking", "rewards/format/mean"),
    ("repetition", "completions (repeated 3-grams)")])
def test_each_health_rule_fires_on_its_problem_naming_its_metric(kind, metric):
    records, samples = _unhealthy(kind)
    warnings = health.check_health(records, samples)
    assert [(w.kind, w.metric) for w in warnings] == [(kind, metric)]
    assert f"[{metric}]" in str(warnings[0])
    if kind == "reward-hacking":
        assert "rewards/arith_answer/mean stays flat" in warnings[0].message

    monitor = health.HealthMonitor()  # the CLI log: the same warning, once
    by_step = [[s for s in samples if s["step"] == r["step"]] for r in records]
    assert [w.kind for r, new in zip(records, by_step) for w in monitor.update(r, new)] == [kind]


def test_a_kl_spike_must_hold_for_most_of_the_last_steps():
    """KL at 100 for 3 of the last 7 steps, then back down, is the k3 estimate's tail; for 4 of
    them it is a spike."""
    records, _ = healthy_run()

    def spiked(high: int) -> list[dict]:
        return records[:-7] + [{**r, "kl": 100.0} if i < high else r for i, r in enumerate(records[-7:])]

    assert health.check_health(spiked(3)) == []
    assert [w.kind for w in health.check_health(spiked(4))] == ["kl-spike"]


def test_health_warning_in_the_cli_log(tiny_cache, tmp_path, caplog):
    """A real run whose reward never differs within a group (format_strict: the tiny model never
    writes <answer> tags) warns in its log, once, naming frac_reward_zero_std."""
    from lowvram_grpo.config import load_config
    from lowvram_grpo.trainer import train

    config = load_config(preset="tiny-cpu", overrides={
        "output_dir": str(tmp_path / "run"), "max_steps": health.MIN_STEPS + 1, "save_every": 100,
        "rewards": [{"name": "format_strict", "weight": 1.0}]})
    train(config, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                and r.getMessage().startswith("run health")]
    assert len(warnings) == 1 and "[frac_reward_zero_std]" in warnings[0]
