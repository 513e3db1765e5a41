"""Offloaded activations: each decoder layer's checkpointed input waits in CPU memory.

With gradient checkpointing, what a long sequence keeps on the GPU between the forward and the
backward pass is the input of every decoder layer: layers x tokens x hidden x 2 bytes, 295 KB per
token for Qwen3-8B, 9.7 GB at 32K tokens. `offload_activations` moves those inputs to pinned CPU
memory as the forward produces them and brings each back just before the backward pass
recomputes its layer, so the GPU holds a couple of layers' inputs instead of all of them.

How (the idea of torchtune's OffloadActivations and TRL's activation_offloading, narrowed to
the checkpointed inputs): non-reentrant `torch.utils.checkpoint` saves a layer's inputs through
autograd's saved-tensor hooks, outside the checkpointed region; `install` wraps each layer's
checkpoint call in `ActivationOffloader`'s hooks, so exactly those inputs, and nothing the layer
computes, are packed. On CUDA:

- pack (forward): a pinned host buffer, filled by a copy on a side stream that first waits for
  the compute stream; the GPU tensor is marked in use by the side stream (`record_stream`), so
  the allocator reuses its memory only after the copy has read it. The forward never waits.
- unpack (backward, when the layer is recomputed): the compute stream waits for the copy back,
  and the copy of the layer before it (the next one backward needs) starts on the side stream,
  overlapping with this layer's recompute and backward.

On the CPU the inputs are copied to another CPU tensor and back: no memory is saved, but the
tests run the same pack/unpack/prefetch path and count the bytes (see `host_bytes`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch.autograd.graph import saved_tensors_hooks


class _Offloaded:
    """One packed tensor: its host copy, and a device copy once it is being brought back."""

    def __init__(self, index: int, device: torch.device, host: torch.Tensor):
        self.index, self.device, self.host = index, device, host
        self.device_copy: torch.Tensor | None = None  # prefetched for the backward (CUDA)
        self.fetched: torch.cuda.Event | None = None


class ActivationOffloader(saved_tensors_hooks):
    """Saved-tensor hooks that keep packed tensors in CPU memory (pinned, on CUDA).

    Entered around each checkpointed layer call (see `install`). `host_bytes` is what it holds in
    CPU memory now, `peak_host_bytes` the most it held since `reset_peak()`.
    """

    def __init__(self):
        self.host_bytes = self.peak_host_bytes = 0
        self._stream: torch.cuda.Stream | None = None
        # Packed entries by order of packing, weakly: autograd owns them and drops each once its
        # layer's backward has run. The order tells unpack which input to prefetch next.
        self._entries: weakref.WeakValueDictionary[int, _Offloaded] = weakref.WeakValueDictionary()
        self._count = 0
        super().__init__(self._pack, self._unpack)

    def reset_peak(self) -> None:
        self.peak_host_bytes = self.host_bytes

    def _hold(self, nbytes: int) -> None:
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    def _release(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor) -> _Offloaded | torch.Tensor:
        if isinstance(tensor, torch.nn.Parameter) or tensor.device.type not in ("cuda", "cpu"):
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        # Counted before the buffer exists, so that a byte counter watching allocations never
        # sees the host copy as device memory (bench.live_bytes).
        self._hold(nbytes)
        cuda = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        entry = _Offloaded(self._count, tensor.device, host)
        weakref.finalize(entry, self._release, nbytes)
        self._entries[self._count] = entry
        self._count += 1
        if not cuda:
            host.copy_(tensor)
            return entry
        # The copy back (`_fetch`) is queued on the same stream, so it always follows this one.
        stream = self._side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        """Start copying `entry` back to its device: on CUDA on the side stream, after the host
        copy that the same stream made; on the CPU a plain copy (the "device" one)."""
        if entry.device.type != "cuda":
            entry.device_copy = entry.host.clone()
            return
        stream = self._side_stream(entry.device)
        with torch.cuda.stream(stream):
            entry.device_copy = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
            entry.device_copy.copy_(entry.host, non_blocking=True)
            entry.fetched = stream.record_event()

    def _unpack(self, entry: _Offloaded | torch.Tensor) -> torch.Tensor:
        if isinstance(entry, torch.Tensor):
            return entry
        if entry.device_copy is None:
            self._fetch(entry)
        tensor, entry.device_copy = entry.device_copy, None
        if entry.device.type == "cuda":
            compute = torch.cuda.current_stream(entry.device)
            compute.wait_event(entry.fetched)
            tensor.record_stream(compute)  # made on the side stream, used and freed on this one
        # Backward recomputes the layers last to first: the input packed before this one is
        # next; its copy back overlaps with this layer's recompute and backward.
        previous = self._entries.get(entry.index - 1)
        if previous is not None and previous.device_copy is None:
            self._fetch(previous)
        return tensor

    def synchronize(self) -> None:
        """Wait for every copy in flight (before timing, or before freeing what they read)."""
        if self._stream is not None:
            self._stream.synchronize()


def _offloaded_checkpoint(offloader: ActivationOffloader, checkpoint_fn: Callable, function, *args, **kwargs):
    """A layer's checkpoint call with its saved inputs packed by `offloader` (the layer itself
    runs under the checkpoint's own hooks, which take precedence inside it)."""
    with offloader:
        return checkpoint_fn(function, *args, **kwargs)


def checkpointed_layers(model) -> list[torch.nn.Module]:
    """The modules transformers checkpoints one by one (its GradientCheckpointingLayer: the
    decoder layers), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def install(model) -> ActivationOffloader:
    """Offload the checkpointed inputs of `model`'s decoder layers from now on; returns the
    offloader (for its byte counts). Gradient checkpointing must be on (config validation
    says so): it is what decides which tensors the backward pass needs back."""
    layers = [m for m in checkpointed_layers(model) if getattr(m, "gradient_checkpointing", False)]
    if not layers:
        raise ValueError("offload_activations: this model has no gradient-checkpointed layers to offload; "
                         "turn gradient_checkpointing on, or set offload_activations: false")
    offloader = ActivationOffloader()
    for layer in layers:
        layer._gradient_checkpointing_func = functools.partial(_offloaded_checkpoint, offloader,
                                                               layer._gradient_checkpointing_func)
    _base_model(model)._activation_offloader = offloader
    return offloader


def _base_model(model):
    """The transformers model under an optional peft wrapper."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def offloader_of(model) -> ActivationOffloader | None:
    """The offloader `install` put on `model`, if any."""
    return getattr(_base_model(model), "_activation_offloader", None)


@contextlib.contextmanager
def activation_memory(model) -> Iterator[None]:
    """Around one forward pass whose backward follows (logprobs.sequence_logprobs): with offloading
    installed, copies still in flight from an earlier pass that ended in an error are waited for
    first, so that their buffers are not freed under them."""
    offloader = offloader_of(model)
    if offloader is not None and torch.is_grad_enabled():
        offloader.synchronize()
    yield
