"""Export: merge a trained LoRA adapter into its base model and save a standalone model.

    lowvram-grpo export --adapter runs/x/final --merge out/my-model

The result is an ordinary transformers checkpoint (safetensors weights, config, tokenizer) that
loads with `AutoModelForCausalLM.from_pretrained("out/my-model")` and serves with vLLM, TGI or
SGLang without peft.

Why the base is loaded in 16-bit, not 4-bit: training used a 4-bit NF4 copy of the base, but
merging into quantised weights would round the adapter's small updates away (and a 4-bit merged
model could not be saved as a plain checkpoint anyway). The adapter was trained against the
dequantised 4-bit weights, which differ from the 16-bit originals by the quantisation error;
merging into the originals is what QLoRA users do, and the difference is small in practice.
Merging runs on the CPU: it needs the 16-bit model in RAM (about 2 bytes per parameter, e.g.
16 GB for an 8B model), not GPU memory.

Converting to GGUF (llama.cpp, Ollama, LM Studio)
-------------------------------------------------
llama.cpp's converter reads the merged directory directly:

    git clone https://github.com/ggml-org/llama.cpp
    pip install -r llama.cpp/requirements.txt
    python llama.cpp/convert_hf_to_gguf.py out/my-model --outfile model.gguf --outtype q8_0

`--outtype f16` keeps full precision; for 4-bit files convert to f16 first and then run
`llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M` (a llama.cpp build tool).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lowvram_grpo.checkpoint import replace_dir
from lowvram_grpo.config import ConfigError
from lowvram_grpo.model import ModelLoadError, resolve_model_path

DTYPES = ("float16", "bfloat16", "float32")
ADAPTER_CONFIG = "adapter_config.json"

GGUF_HINT = """To use it with llama.cpp, Ollama or LM Studio, convert it to GGUF:
  git clone https://github.com/ggml-org/llama.cpp && pip install -r llama.cpp/requirements.txt
  python llama.cpp/convert_hf_to_gguf.py {out} --outfile model.gguf --outtype q8_0"""


class ExportError(ConfigError):
    """The export cannot go ahead as asked (e.g. it would overwrite a directory); says what to do.

    A ConfigError (bad command-line input), so the CLI reports it as one line.
    """


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's adapter_config.json, or a FileNotFoundError that says what was expected."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise FileNotFoundError(
            f"--adapter: {adapter_dir} does not exist; give an adapter directory such as "
            "runs/<name>/final or runs/<name>/checkpoint-000050")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"--adapter: {adapter_dir} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter; give "
            "a run's final/ or checkpoint-NNNNNN/ directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(f"--adapter: {path} is not valid JSON ({err.msg}); the adapter is damaged") from None


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
                  dtype: str = "float16", overwrite: bool = False,
                  trust_remote_code: bool = False) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into its base model and save it to `out_dir`.

    Args:
        adapter_dir: a PEFT adapter directory (a run's `final/` or `checkpoint-N/`).
        out_dir: where the merged model goes; must not exist, be empty, or `overwrite=True`.
        base_model: hub id or directory of the base model; default: the adapter's
            `base_model_name_or_path` (for builtin:tiny that is the local cache directory).
            `builtin:tiny` is accepted too.
        dtype: float16 (default; widest support), bfloat16 (the native dtype of most recent
            models: use it if float16 overflows, e.g. Gemma) or float32.

    Returns the output directory. The model is written to a temporary directory next to it and
    renamed into place, so an interrupted export never leaves a half-written model behind.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ExportError(f"--dtype: must be one of {', '.join(DTYPES)}; got {dtype!r}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapter_config = read_adapter_config(adapter_dir)
    _check_out_dir(out_dir, adapter_dir, overwrite)  # before the slow part: fail fast
    base = resolve_model_path(base_model or adapter_config.get("base_model_name_or_path") or "")
    if not base:
        raise ExportError(f"--adapter: {adapter_dir / ADAPTER_CONFIG} does not name its base model; "
                          "pass --base MODEL (hub id or directory)")

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=getattr(torch, dtype), device_map={"": "cpu"}, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(
            f"could not load the base model '{base}' (from "
            f"{'--base' if base_model else adapter_dir / ADAPTER_CONFIG}): {err}. Pass --base MODEL "
            "with the hub id or local directory the adapter was trained on.") from err
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatches, unknown modules
        raise ModelLoadError(
            f"the adapter in {adapter_dir} does not fit the base model '{base}' "
            f"({' '.join(str(err).split())[:300]}); pass --base with the model it was trained on") from err
    # safe_merge checks the merged weights for NaN/inf before replacing the originals.
    merged = model.merge_and_unload(safe_merge=True)
    tokenizer = AutoTokenizer.from_pretrained(
        adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base,
        trust_remote_code=trust_remote_code)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(tmp)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_out_dir(out_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    out, adapter = out_dir.resolve(), adapter_dir.resolve()
    if out == adapter or out in adapter.parents:
        raise ExportError(f"--merge: {out_dir} contains the adapter itself; choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--merge: {out_dir} is a file; give a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--merge: {out_dir} already exists and is not empty; choose another "
                          "directory or pass --overwrite to replace it")
