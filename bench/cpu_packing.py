"""Is bitsandbytes' CPU inference repacking worth keeping for pure inference?

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight into an inference layout
on its first eval-mode, no-grad forward. lowvram-grpo turns that off for every model that trains
(quantization.py), because training after it is wrong; this measures what pure inference
(evaluation, the app's try-it) would lose if it were off there too, and so why inference-only
loads keep it: greedy generation with the repacking off and on, on a random Qwen2-shaped model,
and whether the two give the same tokens.

    python -m bench.cpu_packing [--hidden 1024 --layers 4 --new-tokens 64 --batch 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import add_output_arguments, command_line, device_description, update_docs, versions
from lowvram_grpo.quantization import (
    import_bitsandbytes,
    is_packed_for_cpu_inference,
    nf4_config,
    set_cpu_inference_packing,
)


def build_model(directory: Path, hidden: int, layers: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256))
    Qwen2ForCausalLM(config).save_pretrained(directory)


def generate(directory: Path, packing: bool, batch: int, new_tokens: int) -> tuple[float, torch.Tensor, bool]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=nf4_config(torch.float32),
                                                 dtype=torch.float32).eval()
    set_cpu_inference_packing(model, inference_only=packing)
    ids = torch.randint(0, 8192, (batch, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up (and the repacking, if on)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    return seconds, out[:, ids.size(1):], is_packed_for_cpu_inference(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    bnb = import_bitsandbytes()
    has_feature = bnb.functional.has_avx512bf16()

    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.hidden, args.layers)
        runs = {packing: [generate(Path(tmp), packing, args.batch, args.new_tokens) for _ in range(args.repeats)]
                for packing in (False, True)}
    best = {packing: min(r[0] for r in results) for packing, results in runs.items()}
    same_tokens = torch.equal(runs[False][0][1], runs[True][0][1])
    packed = runs[True][0][2]
    tokens = args.batch * args.new_tokens
    rows = [f"| repacking {'on (inference-only loads)' if packing else 'off (a model that trains)'} | "
            f"{best[packing]:.2f} s | "
            f"{tokens / best[packing]:.0f} |" for packing in (False, True)]
    body = f"""## bitsandbytes' CPU inference repacking: CPU

Command: `{command_line('bench.cpu_packing', argv)}`

Measured {time.strftime('%Y-%m-%d')} on {device_description('cpu')} (AVX512-BF16: {'yes' if has_feature else 'no'}),
{', '.join(f'{k} {v}' for k, v in versions().items())}. Greedy generation of {args.new_tokens} tokens for
{args.batch} prompts on a random 4-bit Qwen2-shaped model (hidden {args.hidden}, {args.layers} layers), best of
{args.repeats}.

| layout | time | tokens/s |
| --- | --- | --- |
{chr(10).join(rows)}

Repacked: {'yes' if packed else 'no (this CPU lacks the feature, so both rows take the same path)'}. Same greedy
tokens with and without: {'yes' if same_tokens else 'no (the packed path computes in bf16)'}. Speed-up of the
packed layout: {best[False] / best[True]:.2f}x.
"""
    print(body)
    if not args.no_docs:
        update_docs(Path(args.docs), "cpu-packing", body)


if __name__ == "__main__":
    main()
