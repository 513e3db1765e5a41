"""How much the app's live refresh sends, and how long it takes, for a long run.

A run directory with STEPS steps of metrics (every key the trainer logs, four reward
functions) is made by hand; then the app's refresh handler (app.handlers.Handlers.refresh,
what the page's 2-second timer calls) is timed for
  - the first page that opens on the run after the app started (the server reads the whole
    metrics.jsonl once, the page gets the whole history once),
  - another page that opens on it (the server has the file read; the page gets the history),
  - the next refresh after one more step (the server reads one line, the page gets one row),
  - a refresh with nothing new (nothing read, nothing sent).
For comparison, the size of the whole history as the previous page sent it every refresh (every
point of every curve, as gr.LinePlot data) is printed too.

    python -m bench.app_updates                 # 5,000 steps; writes docs/benchmarks.md
    python -m bench.app_updates --steps 300 --no-docs

Results are written into docs/benchmarks.md between `<!-- bench:app-updates -->` markers.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench import common  # noqa: E402  (the docs writer)
from lowvram_grpo.app.dashboard import CURVES  # noqa: E402
from lowvram_grpo.app.handlers import Handlers  # noqa: E402
from lowvram_grpo.app.jobs import JobManager  # noqa: E402
from lowvram_grpo.app.setup import AppContext  # noqa: E402
from lowvram_grpo.config import build_config, save_config  # noqa: E402

FUNCTIONS = ["accuracy", "format_strict", "format_soft", "length_penalty"]


def record(step: int, rng: random.Random) -> dict:
    r = {"step": step, "reward": rng.random(), "reward_std": rng.random() / 3, "frac_reward_zero_std": rng.random(),
         "completions/mean_length": 100 + rng.random() * 50, "completions/min_length": 20 + rng.random() * 10,
         "completions/max_length": 256.0, "completions/clipped_ratio": rng.random() / 5, "kl": rng.random() / 100,
         "loss": rng.random() / 10, "learning_rate": 1e-5 * (1 - step / 10_000), "grad_norm": rng.random(),
         "entropy": 1 + rng.random(), "clip_ratio/low_mean": rng.random() / 100,
         "clip_ratio/high_mean": rng.random() / 100, "clip_ratio/region_mean": rng.random() / 50,
         "num_prompts_truncated": 0, "oom_retries": 0, "step_skipped": 0, "step_time": 20 + rng.random(),
         "generation_time": 15 + rng.random(), "tokens_per_second": 400 + rng.random() * 40,
         "peak_memory_gb": 9 + rng.random()}
    for name in FUNCTIONS:
        r[f"rewards/{name}/mean"], r[f"rewards/{name}/std"] = rng.random(), rng.random() / 3
    return r


def old_page_bytes(records: list[dict]) -> int:
    """The previous page's refresh: every point of its four line plots, every time."""
    rows = [[r["step"], r[k], k] for r in records for k in
            ["reward", "kl", "loss", "completions/mean_length", *(f"rewards/{n}/mean" for n in FUNCTIONS)]]
    return len(json.dumps({"data": rows}))


def timed(fn, setup=lambda: None, repeat: int = 5):
    """The best of `repeat` timings of fn(setup()), and fn's last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        prepared = setup()
        started = time.perf_counter()
        result = fn(prepared)
        best = min(best, time.perf_counter() - started)
    return best, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = AppContext(Path(tmp))
        run = ctx.runs_dir / "long"
        run.mkdir(parents=True)
        save_config(build_config({"output_dir": str(run), "max_steps": args.steps + 1}), run / "config.yaml")
        (run / "status.json").write_text(json.dumps({"state": "running", "step": args.steps,
                                                     "total_steps": args.steps + 1, "pid": None}))
        records = [record(s, rng) for s in range(1, args.steps + 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        metrics, next_step = run / "metrics.jsonl", itertools.count(args.steps + 1)

        def new_app():
            return Handlers(ctx, JobManager(ctx.work_dir), adapter_try_it=None)

        first_s, first = timed(lambda handlers: handlers.refresh("long", [], {}), setup=new_app)
        handlers = new_app()
        sent = handlers.refresh("long", [], {})[-1]
        other_s, other = timed(lambda _: handlers.refresh("long", [], {}))

        def one_more_step():
            with metrics.open("a") as f:
                f.write(json.dumps(record(next(next_step), rng)) + "\n")

        def next_refresh(_):
            nonlocal sent
            out = handlers.refresh("long", [], sent)
            sent = out[-1]
            return out

        next_s, following = timed(next_refresh, setup=one_more_step)
        idle_s, idle = timed(lambda _: handlers.refresh("long", [], sent))
        assert not isinstance(idle[2], str), "a refresh with nothing new must send no curve data"
        assert len(json.loads(following[2])["runs"]["long"]["rows"]) == 1

    rows = [("first page opens on the run (server reads the whole file)", len(first[2]), first_s),
            ("another page opens on it (file already read)", len(other[2]), other_s),
            ("next refresh, one new step", len(following[2]), next_s),
            ("refresh with nothing new", 0, idle_s)]
    old = old_page_bytes(records)
    table = ["| refresh | curve data sent | handler time |", "|---|---:|---:|"]
    table += [f"| {what} | {size / 1024:,.1f} KB | {seconds * 1000:,.0f} ms |" for what, size, seconds in rows]
    print("\n".join(table))
    print(f"previous page (every point of 4 plots, every refresh): {old / 1024:,.1f} KB")
    body = "\n".join([
        f"## App refresh at {args.steps:,} steps: CPU",
        "",
        f"- Command: `python -m bench.app_updates --steps {args.steps}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {os.cpu_count()} CPU cores (shared; load average {os.getloadavg()[0]:.1f} at the end)",
        f"- Run: {args.steps:,} steps, every metric the trainer logs and {len(FUNCTIONS)} reward functions; "
        f"{len(CURVES)} curve panels. Sizes are the JSON the refresh puts on the wire for the curves (status, "
        "log and health text come on top, a few KB).",
        "",
        *table,
        "",
        f"The previous page resent every point of its four plots on every refresh: {old / 1024:,.1f} KB every "
        "2 s at this length. The server reads only the lines added since its previous refresh "
        "(rundir.JsonlFollower); what remains of a refresh's time is the run's status, log tail, checkpoints and "
        "health checks. Times are the best of 5.",
    ])
    if not args.no_docs:
        common.update_docs(common.DEFAULT_DOCS, "app-updates", body)


if __name__ == "__main__":
    main()
