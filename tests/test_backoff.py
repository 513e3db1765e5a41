"""Out-of-memory back-off: shrink the chunk that ran out, redo the same work, lose nothing.

CUDA out-of-memory errors are injected on the CPU (torch.OutOfMemoryError is what CUDA raises).
"""

import pytest
import torch
from safetensors.torch import load_file

from lowvram_grpo import logprobs, sampling
from lowvram_grpo.config import load_config
from lowvram_grpo.planning.backoff import MemoryBudgetError, retry_on_oom
from lowvram_grpo.planning.chunking import Chunking
from lowvram_grpo.trainer import train


def test_retry_halves_the_phase_setting_until_it_fits(caplog):
    chunking = Chunking(generation_chunk_size=8, micro_batch_size=4, logprob_chunk_size=256)
    sizes, events = [], []

    def generate(current: Chunking):
        sizes.append(current.generation_chunk_size)
        if current.generation_chunk_size > 2:
            raise torch.OutOfMemoryError("injected")
        return "done"

    assert retry_on_oom("generation", chunking, generate, events) == "done"
    assert sizes == [8, 4, 2] and len(events) == 2
    assert chunking.generation_chunk_size == 2, "the shrunk size stays for the rest of the run"
    # Each back-off is a warning, through logging (the CLI shows it as a `warning:` line).
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("lowvram_grpo.planning.backoff", "WARNING",
         "out of memory during generation; generation_chunk_size 8 -> 4; redoing it"),
        ("lowvram_grpo.planning.backoff", "WARNING",
         "out of memory during generation; generation_chunk_size 4 -> 2; redoing it")]


def test_update_shrinks_micro_batch_then_logprob_chunk_then_gives_up():
    chunking = Chunking(generation_chunk_size=8, micro_batch_size=2, logprob_chunk_size=32)

    def always_oom(current: Chunking):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(MemoryBudgetError, match="micro_batch_size=1, logprob_chunk_size=16: reduce max_completion_length"):
        retry_on_oom("update", chunking, always_oom, events := [])
    assert events == ["out of memory during update: micro_batch_size 2 -> 1",
                      "out of memory during update: logprob_chunk_size 32 -> 16"]


def _config(tmp_path, name, **overrides):
    return load_config(preset="tiny-cpu", overrides={
        "output_dir": str(tmp_path / name), "max_steps": 3, "beta": 0.0, "save_every": 100, **overrides})


def test_oom_in_backward_redoes_the_step_exactly_once(tiny_cache, tmp_path, monkeypatch):
    """Out of memory on the second micro-batch, after the first one's backward: the redo must
    start from clean gradients, so the run equals one that used the smaller size throughout."""
    clean = train(_config(tmp_path, "clean", micro_batch_size=16), progress=False).adapter

    real = logprobs.sequence_logprobs
    grad_calls = {"n": 0}

    def oom_on_second_big_micro_batch(policy, input_ids, *args, **kwargs):
        if torch.is_grad_enabled() and input_ids.size(0) > 16:
            grad_calls["n"] += 1
            if grad_calls["n"] == 2:
                raise torch.OutOfMemoryError("injected")
        return real(policy, input_ids, *args, **kwargs)

    monkeypatch.setattr(logprobs, "sequence_logprobs", oom_on_second_big_micro_batch)
    updates, real_step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: updates.append(1) or real_step(self, *a, **k))
    records = []
    backed_off = train(_config(tmp_path, "oom", micro_batch_size=32), progress=False, on_step=records.append).adapter

    assert len(updates) == 3, "one optimizer step per training step: none lost, none doubled"
    assert [r["oom_retries"] for r in records] == [1, 0, 0]
    assert [r["micro_batch_size"] for r in records] == [16, 16, 16]
    a = load_file(clean / "adapter_model.safetensors")
    b = load_file(backed_off / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def _oom_when_generating_more_than_16(monkeypatch):
    real = sampling.generate_rollouts

    def oom_above_16(*args, chunk_size, **kwargs):
        if chunk_size > 16:
            raise torch.OutOfMemoryError("injected")
        return real(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(sampling, "generate_rollouts", oom_above_16)


def test_oom_in_generation_halves_the_generation_chunk(tiny_cache, tmp_path, monkeypatch):
    _oom_when_generating_more_than_16(monkeypatch)
    records = []
    train(_config(tmp_path, "gen", generation_chunk_size=64), progress=False, on_step=records.append)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["generation_chunk_size"] for r in records] == [16, 16, 16]
    assert [r["oom_retries"] for r in records] == [2, 0, 0]  # 64 -> 32 -> 16


def test_auto_chunk_sizes_come_from_the_planner(tiny_cache, tmp_path, capsys):
    records = []
    train(_config(tmp_path, "auto", generation_chunk_size="auto", micro_batch_size="auto",
                  logprob_chunk_size="auto", vram_gb=4, max_steps=1), progress=False, on_step=records.append)
    assert "auto settings for 4.0 GB" in capsys.readouterr().out
    chosen = records[0]
    assert all(isinstance(chosen[k], int) and chosen[k] >= 1
               for k in ("generation_chunk_size", "micro_batch_size", "logprob_chunk_size"))
    # The saved config keeps what the user asked for.
    assert "generation_chunk_size: auto" in (tmp_path / "auto" / "config.yaml").read_text()


# --- bench.oom_backoff: the GPU demonstration's own checks, on a CPU run ---------------------


@pytest.fixture(scope="module")
def oom_demo():
    from bench import oom_backoff

    return oom_backoff


def test_demo_cap_lies_between_the_smallest_and_the_configured_estimate(oom_demo):
    assert oom_demo.choose_cap_gb(2.0, 6.0) == 3.0
    with pytest.raises(ValueError, match="nothing to back off from"):
        oom_demo.choose_cap_gb(2.0, 2.0)


def test_demo_checks_pass_on_a_backed_off_run_and_fail_without_an_oom(oom_demo, tiny_cache, tmp_path, monkeypatch):
    from lowvram_grpo.rundir import read_jsonl

    plain = _config(tmp_path, "plain", save_every=3)
    train(plain, progress=False)
    run = tmp_path / "plain"
    assert oom_demo.optimizer_step_count(run) == 3
    problems = oom_demo.check_run(read_jsonl(run / "metrics.jsonl"), 3, 3, cap_gb=1e6)
    assert problems == ["no out-of-memory error happened: lower --budget-gb"]

    _oom_when_generating_more_than_16(monkeypatch)
    train(_config(tmp_path, "oom", save_every=3, generation_chunk_size=64), progress=False)
    records = read_jsonl(tmp_path / "oom" / "metrics.jsonl")
    assert oom_demo.check_run(records, oom_demo.optimizer_step_count(tmp_path / "oom"), 3, cap_gb=1e6) == []
    assert "optimizer stepped 2 times" in " ".join(oom_demo.check_run(records, 2, 3, cap_gb=1e6))
    assert "peaked above" in " ".join(oom_demo.check_run(records, 3, 3, cap_gb=-1.0))


def test_auto_budget_on_a_gpu_is_what_is_free_now(monkeypatch):
    """Without vram_gb, a 12 GiB card with 5.5 GiB held by a display or another job plans with
    the 6.5 GiB free (plus the CUDA context the planner counts itself), never more than the card."""
    from lowvram_grpo.planning.memory import CUDA_OVERHEAD_BYTES
    from lowvram_grpo.planning.planner import device_memory_gb

    gib = 2**30
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(6.5 * gib), 12 * gib))
    assert device_memory_gb(cuda) == pytest.approx(6.5 + CUDA_OVERHEAD_BYTES / gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(11.9 * gib), 12 * gib))
    assert device_memory_gb(cuda) == 12.0
