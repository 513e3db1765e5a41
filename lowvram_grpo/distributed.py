"""Data-parallel training over several processes (one per GPU, or CPU processes for testing).

The engines are the usual ones: a launcher (`accelerate launch` or `torchrun`) starts N copies
of `python -m lowvram_grpo train ...`, accelerate's `PartialState` joins them into one
`torch.distributed` process group (nccl on GPUs, gloo on the CPU) and gives each its device,
and the helpers below are accelerate's collectives (`accelerate.utils`) where it has the one
needed, `torch.distributed` where it has not (each such helper says why).

How a step is shared (see trainer.py):
- every process draws the same global prompt list and takes a contiguous share (whole groups),
- rewards are gathered, so advantages are computed on the whole batch exactly as by one process,
- each process accumulates its share's gradient with the loss normalised by the whole step's
  counts, then the LoRA gradients are summed over processes (all-reduce) before clipping:
  every process applies the identical update and the weights never drift apart,
- metrics are gathered; only rank 0 writes the run directory.

A single process needs none of this: without a launcher every helper is a no-op (no process
group, no accelerate state), and a run behaves exactly as it does without this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast, gather, gather_object, pad_across_processes

from lowvram_grpo.config import ConfigError

T = TypeVar("T")

# Launchers announce the world size in one of these (torchrun/accelerate; MPI flavours).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _default_device() -> torch.device:
    from lowvram_grpo.model import default_device

    return default_device()


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_default_device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and shows the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_world: World | None = None
_owns_process_group = False


def launched_world_size() -> int:
    """How many processes the launcher started (1 when run directly)."""
    for name in WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return 1


def world() -> World:
    """This process's place in the run; joins the process group on first call if launched."""
    global _world, _owns_process_group
    if _world is None:
        if launched_world_size() > 1 or (dist.is_available() and dist.is_initialized()):
            had_group = dist.is_initialized()
            # cpu=True where there is no GPU: PartialState then uses gloo (MULTI_CPU) instead
            # of deciding there is nothing to distribute.
            state = PartialState(cpu=not torch.cuda.is_available())
            _owns_process_group = not had_group and dist.is_initialized()
            device = state.device if state.device.type == "cuda" else torch.device("cpu")
            _world = World(state.process_index, state.num_processes, state.local_process_index, device)
        else:
            _world = World()
    return _world


def is_main_process() -> bool:
    return world().is_main


def check_world_size(config, world_size: int) -> None:
    """Each process takes whole prompts (whole groups), so the prompts must divide evenly."""
    if world_size < 1:
        raise ConfigError(f"--num-processes: must be at least 1, got {world_size}")
    if config.prompts_per_step % world_size:
        multiple = -(-config.prompts_per_step // world_size) * world_size
        raise ConfigError(
            f"prompts_per_step: {config.prompts_per_step} prompts cannot be shared evenly by {world_size} "
            f"processes (each takes whole prompts with their {config.num_generations} completions); use a "
            f"multiple of {world_size}, e.g. prompts_per_step={multiple}")


def finish() -> None:
    """End of a successful run: wait for every process (rank 0 may still be writing), then
    leave the process group if this module created it."""
    global _owns_process_group
    if not world().distributed:
        return
    barrier()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _owns_process_group = False


def abort() -> None:
    """End of a failed run: leave the process group at once, without the barrier of finish()
    (the other processes may never reach it), so no process is left holding it."""
    global _owns_process_group
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _owns_process_group = False


# --- collectives (no-ops for one process) -----------------------------------------------------


# Each helper first asks world(): a single process never creates accelerate's state.


def barrier() -> None:
    if world().distributed:
        PartialState().wait_for_everyone()


def main_process_first() -> contextlib.AbstractContextManager[None]:
    """Rank 0 runs the block first, the others after it (e.g. build or download a model once)."""
    return PartialState().main_process_first() if world().distributed else contextlib.nullcontext()


def local_share(items: Sequence[T] | torch.Tensor) -> Sequence[T] | torch.Tensor:
    """This process's contiguous share of a step-wide list or tensor (dim 0): rank r of W takes
    the r-th of W equal parts. The length must divide evenly (see `check_world_size`)."""
    w = world()
    if not w.distributed:
        return items
    size = len(items) // w.world_size
    return items[w.rank * size:(w.rank + 1) * size]


def strided_share(items: Sequence[T]) -> Sequence[T]:
    """Every W-th item from this process's rank on: for lists of any length (shares differ by
    at most one item; a process may get none)."""
    w = world()
    return items[w.rank::w.world_size] if w.distributed else items


def broadcast_parameters(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s values into every process's `params` (a common starting point)."""
    if not world().distributed:
        return
    with torch.no_grad():
        # On the process group's device (a CUDA tensor for nccl), then back where each lives.
        received = broadcast([p.data.to(world().device) for p in params], from_process=src)
        for p, value in zip(params, received):
            p.data.copy_(value)


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's gradient over processes, in place (one flat buffer per dtype).

    A missing gradient counts as zeros, so that every process sends the same buffer layout.
    Ours, not accelerate's: its answer is to wrap the model in DDP, which all-reduces during
    every backward; a process that backs off after an OOM (planning/backoff.py) redoes its
    micro-batches in smaller pieces, so the processes would run different numbers of backward
    passes and wait in collectives the others never enter. Summing once, after a step's
    micro-batches, syncs only where every process arrives.
    """
    if not world().distributed:
        return
    device = world().device
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):  # the same order on every process
        group = by_dtype[dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device)
                          for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            value = flat[offset:offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)


def _reduce(values, op):
    """Ours: accelerate's `reduce` takes tensors only and has no maximum; this one also reduces
    numbers and dicts of numbers (metrics), which keep their type."""
    if not world().distributed:
        return values
    device = world().device
    if isinstance(values, torch.Tensor):
        out = values.detach().to(device, copy=True)
        dist.all_reduce(out, op=op)
        return out.to(values.device)
    if isinstance(values, dict):
        keys = sorted(values)  # the same order on every process
        reduced = _reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64), op).tolist()
        return {k: type(values[k])(v) if isinstance(values[k], (int, float)) else v
                for k, v in zip(keys, reduced)}
    if isinstance(values, (int, float)):
        return type(values)(_reduce(torch.tensor([float(values)], dtype=torch.float64), op).item())
    raise TypeError(f"cannot reduce {type(values).__name__}")


def all_reduce_sum(values):
    """Sum over processes of a tensor, a number, or a dict of numbers (same keys everywhere).
    Numbers keep their type (an int count stays an int)."""
    return _reduce(values, dist.ReduceOp.SUM if dist.is_available() else None)


def all_reduce_max(values):
    """Maximum over processes; same forms as `all_reduce_sum`."""
    return _reduce(values, dist.ReduceOp.MAX if dist.is_available() else None)


def any_rank(flag: bool) -> bool:
    """True on every process if it is True on any: a decision all processes take together."""
    if not world().distributed:
        return bool(flag)
    return bool(all_reduce_max(int(bool(flag))))


def all_gather_tensor(tensor: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
    """Every process's tensor, concatenated along dim 0 in rank order.

    Shapes may differ: dim 0 may have any length, and the other dims are padded with
    `pad_value` to the largest among processes (e.g. right-padded completion ids).
    """
    if not world().distributed:
        return tensor
    is_bool = tensor.dtype == torch.bool
    local = tensor.detach().to(world().device)
    if is_bool:  # not every backend reduces or gathers bool
        local = local.to(torch.uint8)
    # accelerate's gather needs one shape everywhere: pad every dim to the largest (dim 0 too),
    # gather, then cut each process's rows back to its own count.
    rows = gather_objects(local.shape[0])
    for dim in range(local.dim()):
        local = pad_across_processes(local, dim=dim, pad_index=pad_value)
    parts = gather(local).unflatten(0, (world().world_size, -1))
    out = torch.cat([part[:n] for part, n in zip(parts, rows)]).to(tensor.device)
    return out.bool() if is_bool else out


def gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, as a list in rank order (on every process)."""
    if not world().distributed:
        return [obj]
    return gather_object([obj])  # accelerate concatenates the processes' lists


# --- launching: `lowvram-grpo train --num-processes N` -----------------------------------------


def already_launched() -> bool:
    return launched_world_size() > 1 or "LOCAL_RANK" in os.environ


def launch_command(num_processes: int, train_args: list[str]) -> list[str]:
    """`accelerate launch` running `python -m lowvram_grpo <train_args>` on N local processes.

    `--multi_gpu` is also what gives N processes without a GPU: accelerate then starts them
    with torchrun and each joins a gloo group on the CPU. (`--cpu` would start only one: it
    expects MPI for more.) Port 0 picks a free port, so two runs on one machine do not clash.
    """
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lowvram_grpo", *train_args]


def launch(num_processes: int, train_args: list[str]) -> int:
    """Run `lowvram-grpo <train_args>` as N data-parallel processes and wait; returns the exit status.

    Ctrl-C or SIGTERM sent to this process is passed on to the training processes as SIGTERM
    (they finish the step, save a checkpoint together and exit). The launcher itself ignores
    Ctrl-C: torchrun would otherwise kill the training processes 30 s after the signal, in the
    middle of their checkpoint if a step takes longer than that.
    """
    if already_launched():
        raise ConfigError("--num-processes: this process was itself started by a launcher "
                          "(accelerate launch / torchrun); give the number of processes to the launcher only")
    if torch.cuda.is_available() and torch.cuda.device_count() < num_processes:
        raise ConfigError(f"--num-processes: {num_processes} processes need {num_processes} GPUs (one each), "
                          f"but {torch.cuda.device_count()} are visible")
    # torchrun's --signals_to_handle (read from PET_*), without SIGINT: see above.
    env = {**os.environ, "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGHUP,SIGQUIT"}
    # SIGINT ignored at exec time stays ignored in the launcher (Python keeps an inherited
    # SIG_IGN); the training processes install their own handler when training starts.
    previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = subprocess.Popen(launch_command(num_processes, train_args), env=env)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)

    def pass_on(signum, frame):
        for pid in _children(process.pid) or [process.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    handlers = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def _children(pid: int) -> list[int]:
    """The training processes: torchrun (inside the launcher) starts them as its children."""
    try:
        import psutil

        return [child.pid for child in psutil.Process(pid).children()]
    except Exception:  # psutil missing or the launcher already gone
        return []
