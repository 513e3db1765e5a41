#!/usr/bin/env python
"""Every GPU measurement of docs/benchmarks.md in one short run, each part on its own time budget.

    bash bench/gpu_suite.sh               # the GPU machine: installs carried wheels, then runs this
    python -m bench.gpu_suite --dry-run   # the same plumbing on the CPU with tiny shapes (< 2 minutes)

The parts (numbered as in the issue that asked for them, #17):

1. compare: ours vs TRL's GRPOTrainer with identical settings (bench.bench_grpo), Qwen2.5-1.5B
   shape, G=8, 2 prompts/step, prompt 256 + completion 1024: peak memory, step time, generated
   tokens/s and the ratios. One warm-up and one measured step each.
2. memory: ours alone on the Qwen2.5-7B and Llama-3.1-8B shapes, same lengths, one step each:
   peak memory against the 12 GB and 13 GB targets and the planner's estimate against
   torch.cuda.max_memory_allocated.
3. backoff: the out-of-memory back-off meeting CUDA's allocator limit (bench.oom_backoff).
4. profile: where a generated token's time goes (bench.decode_profile), Qwen2.5-1.5B shape,
   generation chunks of 8 and 32 sequences, beside the memory-bandwidth floor.
5. longctx (issue 25): one update of a 16K-token sequence, Qwen2.5-1.5B shape, as it is, with
   offloaded activations, and with sequence-chunked layers too (bench.long_context_step): peak
   memory, step time and the planner's estimate.

They run in four stages: profile, compare, longctx, each with the GPU to itself because they time
things; then memory and backoff together, side by side on the GPU (the two architectures of
part 2 in parallel too), because they only measure memory (torch's per-process figures,
unaffected by other processes) and correctness.

Every part has a budget (seconds, --budget PART=S) and gets a deadline from it, never past the
suite's own --deadline. A part stops its measuring child when its time is up and still writes
its section from what was measured, marked incomplete; a part that overruns its deadline by
more than a grace period is killed. The suite's own section (`<!-- bench:DEVICE-gpu-suite -->`)
says how each part ended and how long it took.

Results: each part writes its section of the docs file (docs/benchmarks.md; in a dry run a copy
inside --results, so that CPU figures never replace GPU ones), raw results (settings, per-step
lines, logs, the profiler's operator tables) go to --results, and with --out the docs file and
a tarball of the results are copied there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common

GRACE_S = 20  # how far past its deadline a part may run before it is killed
MEMORY_TARGETS_GB = {"qwen2.5-7b": 12.0, "llama-3.1-8b": 13.0}
COMPARE_ARCH = "qwen2.5-1.5b"

# Seconds per part on the GPU, with ~25 s of setup in gpu_suite.sh: 8 minutes in all (the last
# stage's deadline is also cut to the suite's). Estimates, not yet measured on an H200, from a
# decode step of ~30 ms (4-bit + LoRA generation is bound by Python and kernel launches, so about
# the same for 1.5B and 8B shapes): profile = build and save the 1.5B model, load it, 3 x 18
# decode steps per chunk size and the profiler's post-processing; compare = per trainer ~20 s of
# imports and loading plus 2 steps of ~40 s (1024 decode steps, then the update), each trainer
# getting half; memory = build, save and load a 7B/8B model, one step; backoff = 2 steps with
# retries of the cheap phases.
# longctx = load the 1.5B model (built by profile) and three 16K-token updates of ~2-5 s each after
# a warm-up each; compare gives up 40 s for it.
GPU_BUDGETS = {"profile": 70, "compare": 195, "longctx": 40, "memory": 150, "backoff": 150}
# A dry run on a small, shared CPU: the parts take 15-40 s each there.
DRY_RUN_BUDGETS = {"profile": 60, "compare": 90, "longctx": 90, "memory": 90, "backoff": 90}
# Parts in one inner list run at the same time.
STAGES = [["profile"], ["compare"], ["longctx"], ["memory", "backoff"]]


@dataclass
class Job:
    """One measuring command of a part."""
    part: str
    name: str
    argv: list[str]
    work_dir: Path
    proc: subprocess.Popen | None = None
    status: str = "not run"
    seconds: float = 0.0


def part_jobs(part: str, args, results: Path, docs: Path, deadline: float) -> list[Job]:
    """The commands of one part, GPU or dry-run sizes."""
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    common_args = ["--model-cache", str(args.model_cache), "--deadline", repr(deadline), "--docs", str(docs)]
    tiny = ["--tiny-shape"] if dry else []
    # Dry run: the same code on tiny shapes and lengths (a CPU generates a few hundred tokens/s).
    small_run = ["--prompt-length", "16", "--completion-length", "8", "--num-generations", "4",
                 "--prompts-per-step", "1", "--micro-batch-size", "2"] if dry else []

    def job(name: str, module: str, argv: list[str]) -> Job:
        work = results / name
        return Job(part, name, [sys.executable, "-m", module, *argv, "--work-dir", str(work), *common_args], work)

    if part == "profile":
        lengths = ["--prompt-length", "16", "--tokens", "3"] if dry else ["--prompt-length", "256", "--tokens", "16"]
        return [job("profile", "bench.decode_profile",
                    ["--device", device, "--arch", COMPARE_ARCH, *tiny, "--chunks", "8", "32", *lengths])]
    if part == "compare":
        return [job("compare", "bench.bench_grpo",
                    ["--device", device, "--arch", COMPARE_ARCH, *tiny, *small_run, "--warmup", "1", "--steps", "1"])]
    if part == "memory":
        return [job(f"memory-{arch}", "bench.bench_grpo",
                    ["--device", device, "--arch", arch, *tiny, *small_run, "--only", "ours", "--warmup", "0",
                     "--steps", "1", "--target-gb", f"{target:g}"])
                for arch, target in MEMORY_TARGETS_GB.items()]
    if part == "longctx":
        sizes = ["--tokens", "512", "--prompt-length", "32", "--chunk", "128"] if dry else ["--tokens", "16384"]
        return [job("longctx", "bench.long_context_step", ["--device", device, "--arch", COMPARE_ARCH, *tiny, *sizes])]
    if part == "backoff":
        lengths = ["--prompt-length", "16", "--completion-length", "32"] if dry else []
        return [job("backoff", "bench.oom_backoff",
                    ["--device", device, "--arch", COMPARE_ARCH, *tiny, *lengths, "--steps", "2"])]
    raise ValueError(f"unknown part {part}")


def default_model_cache() -> Path:
    """Where the random models go: RAM (/dev/shm) when it has room for the 1.5B, 7B and 8B ones
    (about 35 GB), because writing and reading them counts against the parts' budgets; else the
    temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * common.GIB:
        return shm / "lowvram_grpo_bench"
    return Path(tempfile.gettempdir()) / "lowvram_grpo_bench"


def run_stage(jobs: list[Job], deadlines: dict[str, float]) -> None:
    """Start the jobs together; wait for each until its part's deadline plus the grace period."""
    started = time.time()
    for j in jobs:
        j.work_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{j.name}] {' '.join(j.argv[1:4])} ... (until {deadlines[j.part] - started:.0f} s from now)",
              flush=True)
        with (j.work_dir.parent / f"{j.name}.log").open("w") as log:  # the child keeps its own handle
            j.proc = subprocess.Popen(j.argv, stdout=log, stderr=subprocess.STDOUT, env=common.child_env(),
                                      cwd=common.REPO_ROOT, start_new_session=True)
    for j in jobs:
        try:
            code = j.proc.wait(timeout=max(deadlines[j.part] + GRACE_S - time.time(), 1.0))
            # 0: complete; 1: a section was written from what was measured, but incomplete.
            j.status = {0: "complete", 1: "incomplete"}.get(code, f"failed (exit {code})")
        except subprocess.TimeoutExpired:
            # SIGTERM first: a part stops its own measuring child (bench.common.run_logged), which
            # runs in a process group of its own.
            os.killpg(j.proc.pid, signal.SIGTERM)
            try:
                j.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(j.proc.pid, signal.SIGKILL)
                j.proc.wait()
            j.status = "killed (past its deadline)"
        j.seconds = time.time() - started
        print(f"[{j.name}] {j.status} after {j.seconds:.0f} s", flush=True)
        print(common.log_tail(j.work_dir.parent / f"{j.name}.log", 25), flush=True)


def without_weights(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Tarball filter: the trained adapters and optimizer states (hundreds of MB for a 7B model)
    are not results; their metrics, settings and logs are."""
    name = Path(member.name).name
    return None if name.endswith(".safetensors") or name in ("trainer_state.pt", "optimizer.pt") else member


def suite_section(args, jobs: list[Job], budgets: dict[str, int], total_s: float, command: str) -> str:
    lines = [
        f"## GPU suite: {'dry run on the CPU' if args.dry_run else 'all parts'}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {common.device_description('cpu' if args.dry_run else 'cuda')}",
        f"- Wall time of the suite: {total_s:.0f} s (memory and backoff run side by side)",
        "",
        "| part | run | budget (s) | took (s) | ended |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {j.part} | {j.name} | {budgets[j.part]} | {j.seconds:.0f} | {j.status} |" for j in jobs]
    return "\n".join(lines)


def parse_budgets(values: list[str], defaults: dict[str, int]) -> dict[str, int]:
    budgets = dict(defaults)
    for value in values:
        part, _, seconds = value.partition("=")
        if part not in budgets or not seconds.isdigit():
            raise SystemExit(f"error: --budget {value}: expected PART=SECONDS with PART one of {', '.join(budgets)}")
        budgets[part] = int(seconds)
    return budgets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same plumbing on the CPU with tiny shapes")
    parser.add_argument("--parts", nargs="+", choices=[p for stage in STAGES for p in stage],
                        help="run only these parts (default: all)")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help="a part's time budget (defaults: GPU " +
                             ", ".join(f"{k}={v}" for k, v in GPU_BUDGETS.items()) + ")")
    parser.add_argument("--deadline", type=float, help="time.time() by which everything must be done")
    parser.add_argument("--results", default=str(common.REPO_ROOT / ".benchwork"),
                        help="raw results (default .benchwork/; emptied first)")
    parser.add_argument("--docs", help="docs file to write (default docs/benchmarks.md; in a dry run a copy of it "
                                       "inside --results)")
    parser.add_argument("--model-cache", default=str(default_model_cache()),
                        help="where the random-weight models are built and reused (default: /dev/shm if it has "
                             "40 GB free, else the temporary directory)")
    parser.add_argument("--out", help="copy the docs file and a tarball of the results here")
    args = parser.parse_args(argv)
    budgets = parse_budgets(args.budget, DRY_RUN_BUDGETS if args.dry_run else GPU_BUDGETS)
    parts = args.parts or [p for stage in STAGES for p in stage]

    results = Path(args.results)
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    if args.docs:
        docs = Path(args.docs)
    elif args.dry_run:
        docs = results / "benchmarks.md"
        shutil.copy(common.DEFAULT_DOCS, docs)
    else:
        docs = common.DEFAULT_DOCS
    suite_deadline = args.deadline or float("inf")

    started = time.time()
    jobs: list[Job] = []
    for stage in STAGES:
        stage_parts = [p for p in stage if p in parts]
        if not stage_parts:
            continue
        now = time.time()
        deadlines = {p: min(now + budgets[p], suite_deadline - GRACE_S) for p in stage_parts}
        stage_jobs = [j for p in stage_parts for j in part_jobs(p, args, results, docs, deadlines[p])]
        run_stage(stage_jobs, deadlines)
        jobs += stage_jobs
    total = time.time() - started

    device = "cpu" if args.dry_run else "cuda"
    section = suite_section(args, jobs, budgets, total, common.command_line("bench.gpu_suite", argv))
    common.update_docs(docs, f"{device}-gpu-suite", section)
    print(section)
    (results / "suite.json").write_text(json.dumps(
        {"dry_run": args.dry_run, "seconds": total, "budgets": budgets,
         "parts": [{"part": j.part, "name": j.name, "status": j.status, "seconds": j.seconds, "argv": j.argv[1:]}
                   for j in jobs]}, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(docs, out / "benchmarks.md")
        with tarfile.open(out / "benchwork.tgz", "w:gz") as tar:
            tar.add(results, arcname=results.name, filter=without_weights)
        print(f"wrote {out / 'benchmarks.md'} and {out / 'benchwork.tgz'}")
    print(f"suite finished in {total:.0f} s")
    return 0 if all(j.status == "complete" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
