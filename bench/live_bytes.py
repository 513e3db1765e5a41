"""Counting the bytes of live tensors from the dispatcher, without a GPU.

`bench.planner_check` measures each phase of a training step with `LiveTensorBytes`;
`bench.oom_backoff` caps a CPU run with `CappedTensorBytes`, a stand-in for CUDA's allocator
limit in its dry run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created under it that are still alive, and the
    peak of that count. Views share their base's storage, so nothing is counted twice."""

    def __init__(self, offloaded: Callable[[], int] = lambda: 0):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0
        # Bytes of the counted storages that stand for CPU memory (offload.ActivationOffloader's
        # host copies, on a CPU run): `device_peak` is the peak of the rest, as a GPU would hold it.
        self.offloaded = offloaded
        self.device_peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage())
        self.peak = max(self.peak, self.current)
        self.device_peak = max(self.device_peak, self.current - self.offloaded())
        return out

    def reset_peaks(self) -> None:
        self.peak = self.current
        self.device_peak = self.current - self.offloaded()

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self.sizes or storage.nbytes() == 0:
            return
        self.sizes[key] = storage.nbytes()
        self.current += storage.nbytes()
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self.sizes.pop(key)


class CappedTensorBytes(LiveTensorBytes):
    """LiveTensorBytes that raises torch.OutOfMemoryError, as CUDA's allocator does under
    `set_per_process_memory_fraction`, when a new storage would take the count over `cap_bytes`.
    The new tensor exists for a moment (it is made before it can be measured) but is never
    counted: it is dropped as the error unwinds."""

    def __init__(self, cap_bytes: int):
        super().__init__()
        self.cap_bytes = cap_bytes

    def _track(self, storage) -> None:
        if id(storage) not in self.sizes and self.current + storage.nbytes() > self.cap_bytes:
            raise torch.OutOfMemoryError(
                f"CPU stand-in for a CUDA limit: {storage.nbytes()} more bytes would exceed the cap of "
                f"{self.cap_bytes} ({self.current} held)")
        super()._track(storage)
