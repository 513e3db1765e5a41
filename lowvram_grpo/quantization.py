"""bitsandbytes, imported and set up so that 4-bit training is the same on every CPU.

Two behaviours of bitsandbytes' CPU backend (0.46 and later) depend on the processor, and both
are switched off here:

1. On a CPU with AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and Zen 5), the first
   forward of a `Linear4bit` in eval mode without gradients repacks its weight into a CPU
   inference layout, for good. Every later forward, training included, then goes through
   `gemv_4bit`, which has no autograd path to its input and adds the bias in place: a model
   with biases (Qwen2) crashes at the first update, and a model without trains silently wrong
   (no gradient flows back through the frozen layers to the LoRA weights below them). Our step
   generates (eval, no grad) and then trains, so every run would hit it.
   `set_cpu_inference_packing(model, inference_only=False)` turns the repacking off for every
   4-bit layer of a model that trains. A model that only generates keeps it where the layer's
   shape allows: greedy generation is ~4x faster with it (docs/benchmarks.md,
   bench/cpu_packing.py), though in bf16, so its tokens can differ from the training path's.

2. On the same CPUs, importing bitsandbytes asks the Hugging Face Hub for a kernel
   (`kernels-community/quantization-bitsandbytes`), at run time and unasked, and logs two
   warning lines when it is offline. That kernel only serves the packed layout we never use,
   so `import_bitsandbytes()` refuses the lookup before it reaches the network and drops the
   warning about it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

_CPU_BACKEND_LOGGER = "bitsandbytes.backends.cpu.ops"
# bitsandbytes' _convert_weight_packed_for_cpu packs output rows in blocks of this many.
_PACKED_BLOCK_ROWS = 32


class KernelDownloadRefused(RuntimeError):
    """Raised to bitsandbytes in place of a run-time kernel download."""


def import_bitsandbytes() -> ModuleType:
    """`import bitsandbytes`, without its run-time kernel download (see the module docstring).

    Call it before anything else imports bitsandbytes (transformers imports it when a 4-bit
    model loads, peft when it wraps one): the download is attempted once, at import."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    with _no_hub_kernels():
        import bitsandbytes
    return bitsandbytes


@contextlib.contextmanager
def _no_hub_kernels() -> Iterator[None]:
    try:
        import kernels
    except ImportError:  # without the `kernels` package bitsandbytes cannot ask the Hub either
        yield
        return

    original = kernels.get_kernel

    def refuse(repo_id: str, *args, **kwargs):
        raise KernelDownloadRefused(f"lowvram-grpo does not download {repo_id} at run time")

    def drop_refusal(record: logging.LogRecord) -> bool:
        return not any(isinstance(arg, KernelDownloadRefused) for arg in record.args or ())

    logger = logging.getLogger(_CPU_BACKEND_LOGGER)
    kernels.get_kernel = refuse
    logger.addFilter(drop_refusal)
    try:
        yield
    finally:
        kernels.get_kernel = original
        logger.removeFilter(drop_refusal)


def nf4_config(dtype: torch.dtype):
    """The 4-bit NF4 quantisation every model here loads with (double quantisation on, the
    weights stored in the compute dtype so that FSDP-style sharding and peft see one dtype)."""
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def set_cpu_inference_packing(model: torch.nn.Module, *, inference_only: bool) -> int:
    """Decide, for every 4-bit layer of `model`, whether bitsandbytes may repack it into its CPU
    inference layout (see the module docstring). Returns how many layers may.

    A model that trains (`inference_only=False`) is never repacked, so gradients always flow
    through its frozen 4-bit weights. A model that only generates (evaluation, the app's try-it
    and Try rewards) keeps bitsandbytes' choice, ~4x faster greedy generation on the CPUs that
    have the feature, except in layers the packed layout cannot hold (an output width that is
    not a multiple of its 32-row block: Gemma 4, Qwen3.5 and Granite 4 have some)."""
    bnb = import_bitsandbytes()
    cpu_has_feature = bool(bnb.functional.has_avx512bf16())
    allowed = 0
    for layer in model.modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        if not hasattr(layer, "support_avx512bf16_for_cpu"):
            # A bitsandbytes release that renamed the switch: fail loudly rather than train
            # wrong on the CPUs that have the feature (scripts/test --latest runs this).
            raise RuntimeError(
                f"bitsandbytes {bnb.__version__}: Linear4bit has no 'support_avx512bf16_for_cpu' switch, so "
                "lowvram-grpo cannot keep its CPU inference repacking away from training. Install the tested "
                "versions (constraints.txt, see the README)")
        fits = layer.out_features % _PACKED_BLOCK_ROWS == 0 and layer.in_features % 2 == 0
        layer.support_avx512bf16_for_cpu = inference_only and cpu_has_feature and fits
        allowed += layer.support_avx512bf16_for_cpu
    return allowed


def is_packed_for_cpu_inference(model: torch.nn.Module) -> bool:
    """True when any 4-bit layer of `model` holds its weight in the CPU inference layout."""
    bnb = import_bitsandbytes()
    return any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None)
