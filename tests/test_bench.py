"""Smoke tests for bench.bench_grpo: it runs both trainers on the CPU and reports them, it
rewrites only its own section of docs/benchmarks.md, and a trainer stopped half-way is reported
from the steps it finished.

Not a timed test: nothing here asserts on speed or memory, only that the figures exist.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_grpo, common

REPO = Path(__file__).resolve().parent.parent

FOREIGN = """# Benchmarks

Intro written by someone else.

<!-- demo:tiny-cpu -->
## Another section
| a | b |
|---|---|
| 1 | 2 |
<!-- /demo:tiny-cpu -->
"""


# --- the docs section writer (fast) -------------------------------------------------------------


def test_update_docs_creates_the_file(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    common.update_docs(path, "cpu-tiny", "table one")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "<!-- bench:cpu-tiny -->\ntable one\n<!-- /bench:cpu-tiny -->" in text


def test_update_docs_appends_then_replaces_only_its_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(FOREIGN)
    common.update_docs(path, "cpu-tiny", "first")
    common.update_docs(path, "cuda-qwen2.5-7b", "gpu figures")
    common.update_docs(path, "cpu-tiny", "second")
    text = path.read_text()
    assert text.startswith(FOREIGN.rstrip("\n"))  # the other sections, byte for byte
    assert "first" not in text and text.count("second") == 1
    assert text.count("<!-- bench:cpu-tiny -->") == 1 and text.count("<!-- /bench:cpu-tiny -->") == 1
    assert "<!-- bench:cuda-qwen2.5-7b -->\ngpu figures\n<!-- /bench:cuda-qwen2.5-7b -->" in text


def test_table_has_both_rows_and_ratios():
    summary = {"peak_memory_gb": 1.0, "rss_after_imports_gb": 0.5, "step_time_s": 2.0, "cpu_step_time_s": 1.0,
               "tokens_per_s": 10.0, "mean_completion_length": 3.0}
    trl = {**summary, "peak_memory_gb": 2.0, "step_time_s": 4.0, "cpu_step_time_s": 4.0, "tokens_per_s": 5.0}
    table = bench_grpo.format_table({"ours": summary, "trl": trl}, "cpu")
    assert "| lowvram-grpo |" in table and "| TRL GRPOTrainer |" in table
    assert "| ours / TRL | 0.50x | 1.00x | 0.50x | 0.25x | 2.00x |" in table
    gpu = bench_grpo.format_table({"ours": summary, "trl": trl}, "cuda")
    assert "RSS" not in gpu and "| ours / TRL | 0.50x | 0.50x | 2.00x |" in gpu


def test_cuda_needs_an_architecture():
    with pytest.raises(SystemExit):
        bench_grpo.parse_args(["--device", "cuda"])
    args = bench_grpo.parse_args(["--device", "cuda", "--arch", "qwen2.5-7b"])
    assert (args.steps, args.warmup) == (2, 1)


def test_bench_tokenizer_round_trips_prompts_for_qwen_and_llama(tmp_path):
    """The random-weight GPU path: prompts must be exactly N tokens under the tokenizer class
    transformers picks for each model type (Qwen2Tokenizer for qwen2)."""
    import json

    from lowvram_grpo.model import load_tokenizer
    from lowvram_grpo.planning.model_shape import load_arch

    for arch in ("qwen2.5-0.5b", "llama-3.2-3b"):
        folder = tmp_path / arch
        values = load_arch(arch)
        common.bench_tokenizer(values["vocab_size"]).save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(values))
        tokenizer = load_tokenizer(str(folder))
        prompt = common.random_prompts(num_rows=1, length=64, seed=0)[0]["prompt"]
        assert len(tokenizer(prompt)["input_ids"]) == 64
        assert len(tokenizer) == values["vocab_size"]
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
        assert tokenizer.decode([values["vocab_size"] - 1]) == f"<t{values['vocab_size'] - 1}>"


def test_bench_reward_varies_within_a_group():
    assert common.bench_reward(None, ["<t20><t48>", "<t10><t12>", "<t13><t15>", "no digits"]) == [1.0, 0.5, 0.0, 0.0]


def test_a_trainer_stopped_half_way_is_reported_from_the_steps_it_finished():
    step = {"step_time": 2.0, "cpu_step_time": 1.0, "completion_tokens": 80.0, "mean_completion_length": 10.0,
            "reward": 0.5, "peak_gb": 3.0, "reserved_gb": 3.5}
    finished = {"status": "ok", "steps": [step, {**step, "step_time": 1.0, "peak_gb": 4.0}],
                "final": {"trainable_params": 10}, "load_average_before": None}
    stopped = {"status": "timed out", "steps": [{**step, "step_time": 5.0}], "final": {}, "load_average_before": None}
    ours, trl = bench_grpo.pool_runs([finished], warmup=1), bench_grpo.pool_runs([stopped], warmup=1)
    assert (ours["step_time"], ours["peak_memory_gb"], ours["warmup_only"]) == ([1.0], 4.0, False)
    assert (trl["step_time"], trl["warmup_only"], trl["status"]) == ([5.0], True, "timed out")
    assert bench_grpo.pool_runs([{**stopped, "steps": []}], warmup=1) is None

    settings = common.Settings(device="cuda", model_dir="m", model_label="qwen2.5-1.5b (random weights)",
                               dataset_path="d", reward="bench", num_generations=8, prompts_per_step=2,
                               micro_batch_size=4, max_prompt_length=256, max_completion_length=1024,
                               ours_generation_chunk_size=16, warmup_steps=1, steps=1)
    summaries = {"ours": bench_grpo.summarise(ours), "trl": bench_grpo.summarise(trl)}
    section = bench_grpo.docs_section(settings, summaries, "cmd", "GPU", [])
    assert "| TRL GRPOTrainer (warm-up step only) |" in section and "| ours / TRL |" in section
    assert "Incomplete: TRL GRPOTrainer timed out after 1 warm-up step(s), reported above." in section


def test_target_note_counts_what_the_card_holds():
    settings = common.Settings(device="cuda", model_dir="m", model_label="x", dataset_path="d", reward="bench",
                               num_generations=8, prompts_per_step=2, micro_batch_size=4, max_prompt_length=256,
                               max_completion_length=1024, ours_generation_chunk_size=16)
    ours = {"peak_memory_gb": 10.0, "peak_reserved_gb": 11.0}
    assert bench_grpo.target_note(settings, ours, 12.0).startswith("Memory target <= 12 GB: met (peak reserved")
    assert "NOT met" in bench_grpo.target_note(settings, ours, 11.2)  # 11 GB reserved + 0.5 GB CUDA context


# --- the real thing, smallest size --------------------------------------------------------------


def test_cpu_benchmark_runs_both_trainers_and_keeps_other_docs_sections(tiny_cache, tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(FOREIGN + "\n<!-- bench:cpu-tiny -->\nstale figures\n<!-- /bench:cpu-tiny -->\n")
    env = {**common.child_env(), "LOWVRAM_GRPO_CACHE": str(tiny_cache)}
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench_grpo", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--docs", str(docs), "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = result.stdout
    number = r"\d+\.\d+"
    cells = r" \| ".join([number] * 6)  # peak RSS, RSS after imports, step, CPU/step, tok/s, length
    assert re.search(rf"\| lowvram-grpo \| {cells} \|", out), out
    assert re.search(rf"\| TRL GRPOTrainer \| {cells} \|", out), out
    ratios = r" \| ".join([number + "x"] * 5)
    assert re.search(rf"\| ours / TRL \| {ratios} \|", out), out

    text = docs.read_text()
    assert text.startswith(FOREIGN.rstrip("\n"))
    assert "stale figures" not in text
    assert text.count("<!-- bench:cpu-tiny -->") == 1 and text.count("<!-- /bench:cpu-tiny -->") == 1
    section = text.split("<!-- bench:cpu-tiny -->")[1].split("<!-- /bench:cpu-tiny -->")[0]
    assert "| lowvram-grpo |" in section and "| TRL GRPOTrainer |" in section and "ours / TRL" in section
    for must in ("Command: `python -m bench.bench_grpo --steps 2 --warmup 1 --repeats 1", "Versions: torch",
                 "trl 1.16", "Device: CPU"):
        assert must in section


# --- bench.live_bytes and bench.planner_check ------------------------------------------------------


def test_live_tensor_bytes_counts_storages_once_and_forgets_freed_ones():
    import torch

    from bench.live_bytes import LiveTensorBytes

    with LiveTensorBytes() as tracker:
        a = torch.zeros(1024)  # 4 KiB
        view = a[:10]  # same storage: not counted again
        b = torch.ones(256, dtype=torch.float64)  # 2 KiB
        assert tracker.current == 4096 + 2048
        del a, view
        assert tracker.current == 2048
        c = b * 2  # a new 2 KiB result
        del c
    assert tracker.current == 2048 and tracker.peak == 4096 + 2048
    del b


def test_capped_tensor_bytes_raises_out_of_memory_past_the_cap_and_does_not_count_the_tensor():
    import torch

    from bench.live_bytes import CappedTensorBytes

    with CappedTensorBytes(cap_bytes=4096 + 1024) as cap:
        a = torch.zeros(1024)  # 4 KiB: fits
        with pytest.raises(torch.OutOfMemoryError, match="cap"):
            torch.zeros(512)  # 2 KiB more would not
        assert cap.current == 4096 and cap.peak == 4096
        b = torch.zeros(256)  # 1 KiB still fits
        assert cap.current == 4096 + 1024
    del a, b


def test_planner_check_table_shows_measured_estimated_and_error():
    from bench import planner_check

    mib = 2**20
    part = {"measured": 100 * mib, "estimated": 110 * mib}
    result = {"arch": "qwen2.5-0.5b", "layers": 2, "loaded": part, "static": part,
              "phases": dict.fromkeys(("generation", "log-probs", "update"), part),
              "transient": {p: {"measured": 10 * mib, "estimated": 5 * mib} for p in ("generation", "log-probs",
                                                                                    "update")}}
    table = planner_check.format_results([result])
    assert "| qwen2.5-0.5b (2) | 100 / 110 MiB (+10%) |" in table
    assert "| qwen2.5-0.5b (2) | 10 / 5 MiB (-50%) |" in table


def test_app_updates_reports_one_row_per_new_step(capsys):
    """bench.app_updates at a short length: the table's rows, one new step sends about one row's
    kilobyte, and nothing new sends nothing (docs left alone with --no-docs)."""
    pytest.importorskip("gradio")
    from bench import app_updates

    app_updates.main(["--steps", "40", "--no-docs"])
    table = dict(re.findall(r"^\| ([^|]+?) \| ([\d.,]+) KB \|", capsys.readouterr().out, re.M))
    assert list(table) == ["first page opens on the run (server reads the whole file)",
                           "another page opens on it (file already read)", "next refresh, one new step",
                           "refresh with nothing new"]
    assert float(table["next refresh, one new step"]) < 2 and float(table["refresh with nothing new"]) == 0
    assert float(table["another page opens on it (file already read)"]) > 5 * float(
        table["next refresh, one new step"])
