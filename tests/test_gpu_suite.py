"""The one-command GPU suite (bench/gpu_suite.sh): its dry run on the CPU goes through every
part's plumbing with tiny shapes, and the decode profile's split of time into categories.

Nothing here asserts on speed: the figures must exist, be consistent, and land in the right
places (a copy of the docs, never docs/benchmarks.md itself, and the raw-results tarball).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

from bench import decode_profile

REPO = Path(__file__).resolve().parent.parent


def _section(text: str, key: str) -> str:
    assert f"<!-- bench:{key} -->" in text, f"no {key} section"
    return text.split(f"<!-- bench:{key} -->")[1].split(f"<!-- /bench:{key} -->")[0]


def test_dry_run_runs_every_part_and_reports_it(tmp_path):
    docs_before = (REPO / "docs" / "benchmarks.md").read_bytes()
    out = tmp_path / "out"
    env = {**subprocess.os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    result = subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--dry-run", "--results", str(tmp_path / "results"),
         "--model-cache", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert (REPO / "docs" / "benchmarks.md").read_bytes() == docs_before  # CPU figures never land there

    text = (out / "benchmarks.md").read_text()
    suite = _section(text, "cpu-gpu-suite")
    for name in ("profile", "compare", "longctx", "memory-qwen2.5-7b", "memory-llama-3.1-8b", "backoff"):
        assert re.search(rf"\| \w+ \| {re.escape(name)} \| \d+ \| \d+ \| complete \|", suite), suite

    # 1. ours vs TRL, both rows and the ratios.
    compare = _section(text, "cpu-qwen2.5-1.5b-tiny")
    assert "| lowvram-grpo |" in compare and "| TRL GRPOTrainer |" in compare and "| ours / TRL |" in compare
    # 2. ours alone on the two large shapes, against their targets, with the planner's estimate.
    for arch, target in (("qwen2.5-7b", 12), ("llama-3.1-8b", 13)):
        memory = _section(text, f"cpu-{arch}-tiny")
        assert "lowvram-grpo alone" in memory and "TRL" not in memory.split("| trainer |")[1]
        assert f"Memory target <= {target} GB: met" in memory and "Planner check" in memory
    # 3. the back-off met the (stand-in) limit and recovered.
    backoff = _section(text, "cpu-oom-backoff")
    assert "Result: every step ran once" in backoff
    oom_rows = re.findall(r"^\| (\d+) \| (\d+) \|", backoff, re.MULTILINE)
    assert [int(step) for step, _ in oom_rows] == [1, 2] and sum(int(n) for _, n in oom_rows) >= 1
    # 4. the decode profile: one row per chunk size, every category, the floor.
    profile = _section(text, "cpu-decode-profile")
    for category in decode_profile.CATEGORIES:
        assert category in profile
    assert re.search(r"^\| 8 \| \d+\.\d+ \|", profile, re.MULTILINE)
    assert re.search(r"^\| 32 \| \d+\.\d+ \|", profile, re.MULTILINE)

    # 5. long sequences: the three updates, each with its peak, the planner's figure and its time.
    long_context = _section(text, "cpu-long-context")
    rows = re.findall(r"^\| (as it is|offload_activations[^|]*) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
                      long_context, re.MULTILINE)
    assert [r[0] for r in rows] == ["as it is", "offload_activations", "offload_activations + sequence_chunk_size=128"]
    assert float(rows[0][3]) == 0 and float(rows[1][3]) > 0  # offloaded bytes only with offloading
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)

    with tarfile.open(out / "benchwork.tgz") as tar:
        names = tar.getnames()
        summary = json.load(tar.extractfile("results/suite.json"))
        chunk = json.load(tar.extractfile("results/profile/chunk8.json"))
    assert {"results/compare/ours-0.steps.jsonl", "results/compare/trl-0.steps.jsonl",
            "results/profile/ops-chunk32.txt", "results/backoff/steps.jsonl"} <= set(names)
    assert not [n for n in names if n.endswith(".safetensors")]  # adapters are not results
    assert summary["dry_run"] and {p["status"] for p in summary["parts"]} == {"complete"}
    # The categories account for the whole profiled step.
    assert abs(sum(chunk["categories_us"].values()) - chunk["wall_us"]) < 0.01 * chunk["wall_us"]


# --- the profile's categories, on hand-made profiler events ------------------------------------------


def _event(name, parent=None, kernels=(), start=0.0, end=0.0, annotation=False, device="cpu"):
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    return SimpleNamespace(name=name, cpu_parent=parent, kernels=[SimpleNamespace(duration=k) for k in kernels],
                           time_range=Interval(start, end), is_user_annotation=annotation,
                           device_type=DeviceType.CUDA if device == "cuda" else DeviceType.CPU)


def test_gpu_kernels_go_to_the_category_around_the_operator_that_launched_them():
    step = _event("ProfilerStep#2", start=0, end=1000, annotation=True)
    # A kernel launched outside any operator hangs on the range itself (the 10 us one).
    four_bit = _event(decode_profile.LABEL_PREFIX + decode_profile.FOUR_BIT, step, kernels=[10], annotation=True)
    lora = _event(decode_profile.LABEL_PREFIX + decode_profile.LORA, step, annotation=True)
    events = [
        step, four_bit, lora,
        _event("aten::mm", _event("aten::linear", four_bit), kernels=[300]),
        _event("bitsandbytes::dequantize_4bit", four_bit, kernels=[200]),
        _event("aten::mm", lora, kernels=[40]),
        _event("aten::scaled_dot_product_attention", step, kernels=[100]),
        _event("aten::add", step, kernels=[50]),
        # What ran on the device: the kernels above and a copy that no operator claims...
        *[_event("kernel", start=0, end=d, device="cuda") for d in (10, 300, 200, 40, 100, 50, 20)],
        # ...and the GPU-side mirrors of the ranges, which are not device work.
        _event("ProfilerStep#2", start=0, end=1000, annotation=True, device="cuda"),
        _event(four_bit.name, start=0, end=500, annotation=True, device="cuda"),
    ]
    split = decode_profile.categorise(events, on_gpu=True)
    c = split["categories_us"]
    assert (split["steps"], split["wall_us"], split["busy_us"]) == (1, 1000, 720)
    assert (c["4-bit matmuls"], c["LoRA"], c["attention"], c["LM head"]) == (510, 40, 100, 0)
    assert c["other device work"] == 70 and c["Python/launch overhead"] == 280  # add + copy; wall - busy


def test_cpu_time_counts_each_top_level_operator_once():
    step = _event("ProfilerStep#2", start=0, end=100, annotation=True)
    head = _event(decode_profile.LABEL_PREFIX + decode_profile.LM_HEAD, step, annotation=True)
    linear = _event("aten::linear", head, start=10, end=40)
    events = [step, head, linear, _event("aten::addmm", linear, start=12, end=38),  # inside linear: not again
              _event("aten::softmax", step, start=50, end=60)]
    c = decode_profile.categorise(events, on_gpu=False)["categories_us"]
    assert (c["LM head"], c["other device work"], c["Python/launch overhead"]) == (30, 10, 60)
