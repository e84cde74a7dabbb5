"""Reading a short piece after a document (a question, the token ``generate()`` hands over): through the model's
eager forward against one token at a time through the decode step's graphs, in one process on the same state.

    PYTHONPATH=src python benchmarks/question_read.py [--context 8192] [--lengths 1 4 16 32 64 128 256] [--out DIR]
    TRITON_INTERPRET=1 CODA_GQA_L_KERNELS=triton PYTHONPATH=src python benchmarks/question_read.py --quick
        # CPU: a tiny random Llama in Triton's interpreter, eager steps (the test runs this; no timing worth reading)

``graph_prefill.prefill`` decides which way a piece shorter than a chunk goes (``dispatch.stepped_read_tokens``);
this times both ways for each length, as the neural database reads a question: the document's state forked, the
piece read with ``prefill`` and its last token's logits taken. Each (length, path) runs ``--repeats`` times after one
untimed run (captures, compiles); figures are medians, the ratio a ratio of medians measured in the same run.
"same argmax" says whether both paths' last logits pick the same next token (bf16 paths may round apart). The
crossover (the longest length where the steps are faster) is what ``DEFAULT_STEPPED_READ_TOKENS`` should be.
Prints a table last; writes ``DIR/question_read.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from bench_common import run_header, write_result
from torch import Tensor, nn

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache, graph_prefill
from coda_gqa_l.models.graph_decode import GraphDecoderPool, graph_decode_supported
from coda_gqa_l.models.hf_compat import cache_kwargs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "question_read"
PATHS = ("forward", "steps")


@contextlib.contextmanager
def stepped_read_tokens(value: str) -> Iterator[None]:
    """``CODA_GQA_L_STEPPED_READ_TOKENS`` set to ``value`` inside (``dispatch`` reads it at every prefill)."""
    before = os.environ.get(dispatch.STEPPED_READ_ENV)
    os.environ[dispatch.STEPPED_READ_ENV] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[dispatch.STEPPED_READ_ENV]
        else:
            os.environ[dispatch.STEPPED_READ_ENV] = before


def read_piece(model: nn.Module, cache: BoundedCache, piece: Tensor, path: str, chunk: int) -> Tensor:
    """``piece`` into ``cache`` as the neural database reads a question, the way ``path`` says; the last logits."""

    def forward(part: Tensor) -> Tensor:
        return model(part, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1]

    stepped = "0" if path == "forward" else str(piece.shape[1])
    with stepped_read_tokens(stepped), torch.inference_mode():
        logits = graph_prefill.prefill(model, cache, piece, chunk_tokens=chunk, forward=forward)
    assert logits is not None
    return logits


def time_length(
    model: nn.Module, document: BoundedCache, piece: Tensor, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    from model_generate import clock

    row: dict[str, Any] = {"tokens": piece.shape[1]}
    picks = {}
    for path in PATHS:
        times = []
        for repeat in range(args.repeats + 1):
            cache = document.fork()
            start = clock(device)
            logits = read_piece(model, cache, piece, path, args.chunk)
            seconds = clock(device) - start
            if repeat:
                times.append(seconds)
            else:
                row[f"{path}_first_s"] = seconds
                picks[path] = int(logits[0].argmax())
        row[f"{path}_s"] = times
        row[f"{path}_median_ms"] = 1000 * statistics.median(times)
    row["steps_vs_forward"] = row["forward_median_ms"] / row["steps_median_ms"]
    row["same_argmax"] = picks["forward"] == picks["steps"]
    return row


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['model']}, {result['dtype']} on {result['device']}, after {result['context']:,} tokens, "
        f"{result['repeats']} repeats, medians",
        f"{'tokens':>7}{'forward ms':>12}{'steps ms':>10}{'steps faster':>14}  same argmax",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['tokens']:>7}{row['forward_median_ms']:>12.2f}{row['steps_median_ms']:>10.2f}"
            f"{row['steps_vs_forward']:>13.2f}x  {'yes' if row['same_argmax'] else 'no'}"
        )
    lines.append(f"longest length where the steps are faster: {result['crossover']}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192, help="document tokens read before the piece")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (whole chunks replay the model's graphs)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="CPU, tiny random Llama, 64 tokens of context, length 2")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.chunk, args.lengths, args.repeats = 64, 16, [2], 1
        args.device = args.device or "cpu"
    if max(args.lengths) >= args.chunk or min(args.lengths) < 1:
        p.error(f"--lengths must lie in 1 .. {args.chunk - 1} (a whole chunk replays a read graph)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from decode_step import load

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    context = argparse.Namespace(quick=args.quick, context=args.context + max(args.lengths))
    model, ids, name = load(context, device, dtype)
    if device.type != "cuda":
        # the CPU has no CUDA graphs: eager graph steps in Triton's interpreter stand in for them (a smoke run)
        pool = GraphDecoderPool(model, capture=False)
        graph_prefill.graph_decode_supported = lambda model: True  # type: ignore[assignment]
        graph_prefill.shared_decoder_pool = lambda model: pool  # type: ignore[assignment]
    elif not graph_decode_supported(model):
        raise SystemExit("this model cannot be graph-decoded")
    document = BoundedCache(model, block_size=args.chunk)
    read_piece(model, document, ids[:, : args.context], "forward", args.chunk)  # whole chunks: the read graphs
    rows = [time_length(model, document, ids[:, args.context : args.context + n], args, device) for n in args.lengths]
    faster = [row["tokens"] for row in rows if row["steps_vs_forward"] > 1]
    result = {
        **run_header("question_read.py", sys.argv[1:] if argv is None else argv, device, dtype),
        "model": name,
        "context": args.context,
        "repeats": args.repeats,
        "default_stepped_read_tokens": dispatch.DEFAULT_STEPPED_READ_TOKENS,
        "rows": rows,
        "crossover": max(faster) if faster else 0,
    }
    write_result(result, args.out / "question_read.json", table(result))
    return result


if __name__ == "__main__":
    main()
