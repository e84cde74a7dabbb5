"""A graph-decoded step of the neural database's model, path against path in one process: the step's choices that
``kernels/dispatch`` can switch, each decoding the same context with the same greedy tokens.

    PYTHONPATH=src python benchmarks/decode_step.py [--context 8192] [--tokens 128] [--repeats 5] [--out DIR]
    TRITON_INTERPRET=1 CODA_GQA_L_KERNELS=triton PYTHONPATH=src python benchmarks/decode_step.py --quick
        # CPU: a tiny random Llama in Triton's interpreter, eager steps (the test runs this; no timing worth reading)

Variants (each on its own cache, prefilled through the model's graphs as the database ingests, then decoded by its
own ``GraphModelDecoder``, captured inside the variant's switches):

* ``default``: the step as shipped (one-pass step inputs, ``kernels/step_inputs.py``; split attention);
* ``separate inputs``: ``dispatch.separate_step_inputs()``: the gates' sigmoid, the window step and the queries'
  rotation as three kernels;
* ``one-program attention``: ``dispatch.one_program_decode()``: the attention's one program per head;
* ``both``: both switches (the step as the H100 measured it on 2026-12-05, less what came before);
* ``products with prologues`` / ``products after kernels``: ``dispatch.step_product_prologues(True / False)``: the
  residual norms and the MLP's activation in the prologues of the products that read them
  (``kernels/step_products.py``, three kernels fewer a layer), or as separate kernels before cuBLAS;
* ``no dependent launches``: ``dispatch.dependent_launches(False)``: the step's Triton kernels launched one after
  another, not as programmatic dependents of the kernel before (on by default on Hopper).

Each variant decodes ``--tokens`` greedy tokens ``--repeats`` times after ``--warmup`` untimed ones; figures are
medians of the repeats' tokens per second and the ratio a ratio of medians against ``default`` measured in the same
run. "same tokens" says whether a variant's first repeat chose the default's tokens (bf16 paths may round apart).
Prints a table last; writes ``DIR/decode_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_common import run_header, write_result
from torch import Tensor, nn

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache
from coda_gqa_l.models.graph_decode import GraphModelDecoder, graph_decode_supported

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "decode_step"


@contextlib.contextmanager
def _both() -> Iterator[None]:
    with dispatch.separate_step_inputs(), dispatch.one_program_decode():
        yield


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "default": contextlib.nullcontext,
    "separate inputs": dispatch.separate_step_inputs,
    "one-program attention": dispatch.one_program_decode,
    "both": _both,
    "products with prologues": lambda: dispatch.step_product_prologues(True),
    "products after kernels": lambda: dispatch.step_product_prologues(False),
    "no dependent launches": lambda: dispatch.dependent_launches(False),
}


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Tensor, str]:
    """The database's model (folded for inference) and ``context`` token ids on ``device``."""
    if args.quick:
        from model_generate import random_ids, tiny_llama

        from coda_gqa_l.config import BoundedConfig
        from coda_gqa_l.models import convert
        from coda_gqa_l.models.inference import fold_for_inference

        config = BoundedConfig(window=32, segment=8, num_landmarks_exact=4, num_landmarks_summary=4, num_sink=2)
        model = convert(tiny_llama().to(dtype), config)
        fold_for_inference(model)
        ids, _ = random_ids(model.config.vocab_size, args.context)
        name = "tiny random Llama (4/2 heads, 2 layers, D 64), untrained conversion, folded"
    elif getattr(args, "random_weights", False):
        from model_generate import random_ids

        model = smollm2_shaped_random(dtype)
        ids, _ = random_ids(49152, args.context)
        name = "SmolLM2-135M's shape, random base weights + the shipped CoDA weights, folded (no model files needed)"
    else:
        from model_generate import wikipedia_ids

        from coda_gqa_l.models.pretrained import load_coda_smollm2

        model, tokenizer = load_coda_smollm2(dtype=dtype, progress=False)
        ids, _ = wikipedia_ids(tokenizer, args.context)
        name = "SmolLM2-135M-Instruct, shipped weights, folded (the neural database's model)"
    return model.to(device).eval(), ids.to(device), name


def smollm2_shaped_random(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """SmolLM2-135M-Instruct's architecture with random base weights, converted with the shipped CoDA weights and
    folded: the database's model in every shape and kernel (its answers are noise), for timing host and launch costs
    on a machine that does not have the model's files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from coda_gqa_l.models.inference import fold_for_inference
    from coda_gqa_l.models.pretrained import SHIPPED_WEIGHTS
    from coda_gqa_l.models.weights import apply_coda_weights

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = apply_coda_weights(LlamaForCausalLM(config).to(dtype).eval(), SHIPPED_WEIGHTS).eval()
    fold_for_inference(model)
    return model


def run_variant(
    model: nn.Module, ids: Tensor, switch: Callable[[], contextlib.AbstractContextManager[None]],
    args: argparse.Namespace, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Prefill ``ids`` into a fresh cache, then greedy-decode under ``switch``: tokens/s per repeat and the tokens."""
    from model_generate import clock, graph_decode, prefill

    cache = BoundedCache(model, block_size=args.chunk)
    capture = device.type == "cuda"
    with torch.inference_mode():
        first, _ = prefill(model, cache, ids, args.chunk, math.inf, graphs=capture)
    assert first is not None  # no deadline
    seq = ids.new_tensor([[first]])
    with switch(), torch.inference_mode():
        decoder = GraphModelDecoder(model, cache, capture=capture)
        start = clock(device)
        if capture:
            decoder.capture_all()
        seq = graph_decode(decoder, seq, args.warmup, math.inf)[:, -1:]
        warmup_s = clock(device) - start
        rates, chosen = [], []
        for _ in range(args.repeats):
            start = clock(device)
            out = graph_decode(decoder, seq, args.tokens, math.inf)
            rates.append(args.tokens / (clock(device) - start))
            chosen.append(out[0, 1:].tolist())
            seq = out[:, -1:]
    return {"tokens_per_s": rates, "median_tokens_per_s": statistics.median(rates), "warmup_s": warmup_s,
            "first_repeat_tokens": chosen[0]}  # fmt: skip


def table(result: dict[str, Any]) -> list[str]:
    rows = result["variants"]
    base = rows["default"]
    lines = [
        f"{result['model']}, {result['dtype']} on {result['device']}, {result['context']:,} tokens of context, "
        f"{result['tokens']} tokens x {result['repeats']} repeats, medians",
        f"{'variant':<24}{'tokens/s':>10}{'ms/step':>10}{'vs default':>12}  same tokens",
    ]
    for name, row in rows.items():
        rate = row["median_tokens_per_s"]
        same = "yes" if row["first_repeat_tokens"] == base["first_repeat_tokens"] else "no"
        ratio = rate / base["median_tokens_per_s"]
        lines.append(f"{name:<24}{rate:>10.1f}{1000 / rate:>10.3f}{ratio:>11.3f}x  {same}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192, help="tokens read before decoding")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (whole chunks replay the model's graphs)")
    p.add_argument("--tokens", type=int, default=128, help="timed greedy tokens per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=32, help="untimed greedy tokens after the capture")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="CPU, tiny random Llama, 64 tokens of context, 4 x 2 tokens")
    p.add_argument(
        "--random-weights", action="store_true", help="SmolLM2's shape with random base weights (no model files)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.chunk, args.tokens, args.repeats, args.warmup = 64, 16, 4, 2, 2
        args.device = args.device or "cpu"
    if "default" not in args.variants:
        args.variants = ["default", *args.variants]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, ids, name = load(args, device, dtype)
    if not graph_decode_supported(model) and device.type == "cuda":
        raise SystemExit("this model cannot be graph-decoded")
    variants = {v: run_variant(model, ids, VARIANTS[v], args, device) for v in args.variants}
    result = {
        **run_header("decode_step.py", sys.argv[1:] if argv is None else argv, device, dtype),
        "model": name,
        "context": args.context,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "variants": variants,
    }
    write_result(result, args.out / "decode_step.json", table(result))
    return result


if __name__ == "__main__":
    main()
