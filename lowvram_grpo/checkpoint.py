"""Checkpoints: the LoRA adapter in PEFT format plus everything needed to resume exactly.

Layout of `checkpoint-000050/`:
    adapter_model.safetensors, adapter_config.json   loadable with PeftModel.from_pretrained
    trainer_state.pt                                  the resume state: step, optimizer, scheduler, RNG,
                                                      data position, adaptive entropy coefficient
                                                      (entropy_control.py)

A run of N processes (see distributed.py) saves one checkpoint, from rank 0, with the random
state of every process in it ("rng_per_rank"); it resumes with the same number of processes.

A checkpoint is written to a hidden temporary directory and renamed into place, so a kill at
any moment leaves the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowvram_grpo.rundir import STATE_FILE, checkpoint_dirs, checkpoint_name


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(policy, directory: Path) -> None:
    """Adapter weights and config only, in the standard PEFT format (atomic)."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    replace_dir(tmp, directory)


def save_checkpoint(run_dir: Path, step: int, policy, resume_state: dict[str, Any],
                    keep: int = 0, rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint-<step>/ atomically, then delete all but the newest `keep` (0 = keep all).

    `resume_state`: the trainer's part of the resume state (`Learner.resume_state`: optimizer,
    scheduler, data position, ...); the step and the random state are added here.
    `rng_states`: with several processes, every process's `rng_state()` in rank order.
    """
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    state = {"step": step, "rng": rng_state(), **resume_state}
    if rng_states is not None and len(rng_states) > 1:
        state.update(rng=rng_states[0], rng_per_rank=rng_states, world_size=len(rng_states))
    torch.save(state, tmp / STATE_FILE)
    replace_dir(tmp, final)
    if keep:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_resume_state(path: Path, world_size: int = 1) -> dict[str, Any]:
    """The resume state of checkpoint `path`, refused if it was saved by a different number of
    processes: each process's random state is part of it, so only the same number resumes exactly."""
    from lowvram_grpo.config import ConfigError

    # Our own file, written by save_checkpoint: it holds optimizer state and RNG tuples.
    state = torch.load(path / STATE_FILE, weights_only=False)
    saved = state.get("world_size", 1)
    if saved != world_size:
        hint = f"--num-processes {saved}" if saved > 1 else "a single process (no --num-processes)"
        raise ConfigError(f"--resume: {path.name} was saved by a run of {saved} process(es), this one has "
                          f"{world_size}; resume it with {hint}: each process's random state is in the checkpoint")
    return state


def restore_rng_state(state: dict[str, Any], rank: int = 0) -> None:
    """Apply this process's random state from a checkpoint's resume state."""
    set_rng_state(state["rng_per_rank"][rank] if "rng_per_rank" in state else state["rng"])


def load_checkpoint(path: Path, policy, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the adapter weights into `policy` and return the resume state (RNG not yet applied).
    `state`: the resume state if already read (`read_resume_state`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(policy, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {path} does not match this model's adapter: {unexpected[:3]} ...")
    # Our own file, written by save_checkpoint: it holds optimizer state and RNG tuples.
    return state if state is not None else torch.load(path / STATE_FILE, weights_only=False)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`, replacing an existing `final` with at most a moment where the old
    one is parked under a backup name (never a moment where neither exists in full)."""
    if final.exists():
        backup = final.with_name(f".{final.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        final.rename(backup)
        tmp.rename(final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(final)
