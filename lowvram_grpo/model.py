"""The policy: a 4-bit NF4 base model with LoRA adapters on top, and its tokenizer.

One copy of the base weights serves two roles. With the adapter on it is the policy being
trained; inside `reference_model(policy)` (peft's `disable_adapter()`) it is the frozen
reference for the KL penalty. No second model is ever loaded, which is most of the memory
saving over keeping a separate reference copy.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lowvram_grpo.config import TrainConfig
from lowvram_grpo.errors import UserError
from lowvram_grpo.quantization import nf4_config, set_cpu_inference_packing

BUILTIN_PREFIX = "builtin:"
BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_TOOLS = "builtin:tiny-tools"  # the tiny model warmed up to call a calculator (builtin/tiny_tools_model.py)
BUILTIN_TINY_VISION = "builtin:tiny-vision"  # a tiny Qwen2.5-VL for the offline vision demo


class ModelLoadError(UserError, RuntimeError):
    """The model or adapter could not be loaded; the message says why and what to do."""


class ModelNotDownloaded(ModelLoadError):
    """A hub model that is not in the local cache while the Hub cannot be reached."""


def resolve_model_path(name: str) -> str:
    """`builtin:tiny` -> the locally built tiny model's directory; anything else unchanged."""
    if name == BUILTIN_TINY:
        from lowvram_grpo.builtin.tiny_model import tiny_model_path

        return str(tiny_model_path())
    if name == BUILTIN_TINY_TOOLS:
        from lowvram_grpo.builtin.tiny_tools_model import tiny_tools_model_path

        return str(tiny_tools_model_path())
    if name == BUILTIN_TINY_VISION:
        from lowvram_grpo.builtin.tiny_vlm import tiny_vision_model_path

        return str(tiny_vision_model_path())
    if name.startswith(BUILTIN_PREFIX):
        check_model_available(name)  # an unknown built-in: refused with the same message
    return name


def check_model_available(name: str) -> None:
    """Fail in seconds, before the tokenizer, the data or the weights load, when the model
    cannot be loaded at all: a local directory that is not there, or a hub model that is not in
    the local cache while the Hub cannot be reached. Asking the Hub for config.json is the
    first thing loading would do anyway (and it lands in the cache)."""
    if name.startswith(BUILTIN_PREFIX):
        if name not in (BUILTIN_TINY, BUILTIN_TINY_TOOLS, BUILTIN_TINY_VISION):
            raise ModelLoadError(f"model_name_or_path: unknown built-in model '{name}'; the built-in ones are "
                                 f"{BUILTIN_TINY}, {BUILTIN_TINY_TOOLS} and {BUILTIN_TINY_VISION}")
        return
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model_name_or_path: {path} is not a model directory (no config.json there); give a directory "
                "saved with save_pretrained, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
        return
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    download = f"hf download {name}"
    try:
        _reach_hub()
        hf_hub_download(name, "config.json")
    except GatedRepoError:
        raise ModelLoadError(
            f"model_name_or_path: {name} is gated on the Hugging Face Hub; accept its licence on its hub page, "
            f"log in with `hf auth login`, then run `{download}`") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"model_name_or_path: there is no model '{name}' on the Hugging Face Hub (or it is private); check "
            "the id, or give a local directory") from None
    except Exception as err:  # offline: no connection, HF_HUB_OFFLINE, a proxy...
        raise ModelNotDownloaded(
            f"model_name_or_path: {name} is not downloaded and the Hugging Face Hub cannot be reached "
            f"({type(err).__name__}). Download it while online with `{download}` (into the Hub cache, "
            "~/.cache/huggingface), or set model_name_or_path to a local directory; builtin:tiny "
            "works offline.") from None


def _reach_hub(timeout: float = 5.0) -> None:
    """Raise OSError at once when the Hub is unreachable: huggingface_hub itself retries with
    back-off for about half a minute before it gives up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set")
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    socket.create_connection((endpoint.hostname, port), timeout=timeout).close()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs (e.g. the T4), fp32 on the CPU."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template_kwargs: dict | None = None):
    from transformers import AutoTokenizer

    from lowvram_grpo.prompts import set_chat_template_kwargs

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    set_chat_template_kwargs(tokenizer, chat_template_kwargs or {})
    # Batched generation needs a pad token, and prompts are left-padded so that every
    # sequence's completion starts at the same column.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(config: TrainConfig, device: torch.device | None = None, inference_only: bool = False):
    """Load base model (4-bit unless quantization=none) + LoRA; returns (peft_model, tokenizer).
    `inference_only`: the model will only generate, never train (evaluation, the app's try-it).

    An image-text model (its config has a vision_config: Qwen2.5-VL, Qwen3-VL, Gemma 3 4B...)
    loads as its own image-text class, with its processor riding on the tokenizer (see
    vision.attach_processor); its vision tower and projector stay in 16 bits, frozen, without
    LoRA: only the language model is quantised and adapted."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from lowvram_grpo import vision

    device = device or default_device()
    dtype = compute_dtype(config, device)
    path = resolve_model_path(config.model_name_or_path)
    tokenizer = load_tokenizer(path, config.trust_remote_code, config.chat_template_kwargs)
    try:
        is_vision = vision.is_vision_config(AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code))
    except (OSError, ValueError):
        is_vision = False  # from_pretrained below says what is wrong
    vision_modules: list[str] = []
    if is_vision:
        processor = vision.load_processor(path, config.trust_remote_code)
        if processor is not None:
            vision.attach_processor(tokenizer, processor)
        vision_modules = vision.vision_module_names(path, config.trust_remote_code)

    quantization_config = nf4_config(dtype) if config.quantization == "nf4" else None
    if quantization_config is not None and vision_modules:
        # The vision tower is small next to the language model and sees every image token: it
        # stays in 16 bits (the planner counts it so). lm_head is transformers' own default.
        quantization_config.llm_int8_skip_modules = [*vision_modules, "lm_head"]
    model_class = AutoModelForImageTextToText if is_vision else AutoModelForCausalLM
    try:
        base = model_class.from_pretrained(
            path, quantization_config=quantization_config, dtype=dtype, device_map={"": device},
            trust_remote_code=config.trust_remote_code)
    except OSError as err:
        raise ModelLoadError(
            f"model_name_or_path: could not load '{config.model_name_or_path}': {err}. Give a local "
            "directory with config.json and weights, or a hub id while online "
            "(builtin:tiny works offline).") from err

    if quantization_config is not None:
        # Training generates (eval mode, no gradients) and then trains: a model that trains must
        # never switch to bitsandbytes' CPU inference layout (see quantization.py).
        set_cpu_inference_packing(base, inference_only=inference_only)
        _warn_about_unquantised_experts(base, dtype)

    # Only LoRA weights train. We do not call peft's prepare_model_for_kbit_training: it casts
    # the embeddings and LM head to fp32, which for a 150k-token vocabulary costs gigabytes.
    # Log-probs are computed in fp32 chunk by chunk instead (see logprobs.sequence_logprobs).
    base.requires_grad_(False)
    if config.gradient_checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
    base.config.use_cache = True  # generation must keep its KV cache (see rollout.py)

    if config.adapter_path:
        policy = PeftModel.from_pretrained(base, config.adapter_path, is_trainable=True)
    else:
        targets = vision.language_model_targets(base, config.lora_target_modules) if is_vision \
            else config.lora_target_modules
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets,
            modules_to_save=config.lora_modules_to_save or None, task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():
                # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias;
                # the warning is about peft's code, not the user's, so keep it off their screen.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                policy = get_peft_model(base, lora)
        except ValueError as err:
            if "lora_dropout" in str(err):
                # peft adapts the 3-D expert tensors of some mixture-of-experts models (Qwen3-MoE)
                # as parameters, where it has no dropout.
                raise ModelLoadError(
                    f"lora_dropout: peft cannot apply dropout to LoRA on this model's expert weights "
                    f"({type(base).__name__}); set lora_dropout=0") from err
            raise ModelLoadError(f"lora_target_modules: {err}") from err
    # peft keeps the adapter weights in fp32 (autocast_adapter_dtype) on a bf16/4-bit base:
    # they are tiny, and fp32 keeps the optimizer's small updates from rounding away.
    return policy, tokenizer


def _warn_about_unquantised_experts(model, dtype: torch.dtype) -> None:
    """transformers 5 keeps a mixture-of-experts model's experts as 3-D tensors, not nn.Linear
    layers, and bitsandbytes quantises nn.Linear only: the experts (most of such a model) load
    in 16 bits. Training is still correct, but the memory is not what "4-bit" suggests."""
    experts = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 3 and "experts" in name)
    if experts:
        gib = experts * torch.finfo(dtype).bits / 8 / 2**30
        warnings.warn(f"{experts / 1e9:.2f}B mixture-of-experts parameters are not quantised (bitsandbytes "
                      f"quantises nn.Linear layers only) and take {gib:.1f} GB in {str(dtype).removeprefix('torch.')}; "
                      "`lowvram-grpo plan` counts them", UserWarning, stacklevel=3)


def enable_long_context(policy, offload_activations: bool, sequence_chunk_size: int | None) -> None:
    """Switch on what long sequences need (see offload.py and sequence_chunks.py): decoder-layer
    inputs kept in CPU memory between forward and backward, per-token modules run over chunks."""
    from lowvram_grpo import offload, sequence_chunks

    if offload_activations:
        offload.install(policy)
    if sequence_chunk_size:
        sequence_chunks.install(policy, sequence_chunk_size)


@contextlib.contextmanager
def reference_model(policy) -> Iterator[None]:
    """Inside this block `policy` computes the reference model: the same weights, adapter off."""
    with policy.disable_adapter():
        yield
