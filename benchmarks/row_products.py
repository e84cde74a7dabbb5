"""A decode step's one-row products, each alone under a CUDA graph: cuBLAS (``F.linear``; for the down product the
activation's one-pass kernel first, as the folded model runs it) against ``kernels/row_product.py``'s kernel at a few
block shapes, in one process (issue 19: the folded SmolLM2's four products a layer took 3.7-4.0 us each on an H100,
0.49 ms of a 0.89 ms step, where reading their weights takes 0.2-1.2 us).

    PYTHONPATH=src python benchmarks/row_products.py [--calls 30] [--repeats 20] [--out DIR]
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/row_products.py --quick   # CPU smoke run (the test runs it)

Each cell is the median over ``--repeats`` replays of a graph of ``--calls`` calls (``bench_common``), in
microseconds a call; the ratio is cuBLAS's median over the kernel's, same run. "read floor" is the weights' bytes over
the device's copy bandwidth, measured in the same run. Every kernel result is checked against cuBLAS's first
(within twice the bfloat16 reference's error against float64). Prints a table last; writes ``DIR/row_products.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import graphed_call_seconds, run_header, write_result

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.gated_activation import silu_and_mul
from coda_gqa_l.kernels.row_product import row_product

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "row_products"
# the folded SmolLM2-135M's products a layer: (name, outputs, inputs, activation in the prologue)
SHAPES = [("inputs (q, k, v, lambda, gate)", 972, 576, False), ("output", 576, 576, False),
          ("gate and up", 3072, 576, False), ("down (activation first)", 576, 1536, True)]  # fmt: skip
QUICK_SHAPES = [("inputs", 40, 64, False), ("down", 24, 96, True)]
BLOCKS = [(2, 2), (4, 2), (4, 4), (8, 4), (16, 4)]  # (rows a program, warps)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes a second of a 256 MiB device-to-device copy (the read floors' basis)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(128 * 2**20, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = graphed_call_seconds(lambda: dst.copy_(src), 5, 10, device)
    return 2 * src.numel() * src.element_size() / seconds


def measure(shape: tuple[str, int, int, bool], args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            bandwidth: float) -> dict[str, Any]:  # fmt: skip
    name, rows_out, inputs, silu_mul = shape
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 1, inputs * (2 if silu_mul else 1), generator=gen) * 2).to(device, dtype)
    weight = (torch.randn(rows_out, inputs, generator=gen) / inputs**0.5).to(device, dtype)
    cublas = (lambda: F.linear(silu_and_mul(x), weight)) if silu_mul else (lambda: F.linear(x, weight))
    with torch.inference_mode():
        want = cublas()
        exact = F.linear(F.silu(x.double()[..., :inputs]) * x.double()[..., inputs:] if silu_mul else x.double(),
                         weight.double())  # fmt: skip
        base_err = (want.double() - exact).abs().max().item()
        cublas_us = graphed_call_seconds(cublas, args.calls, args.repeats, device) * 1e6
        row = {"shape": name, "outputs": rows_out, "inputs": inputs, "cublas_us": cublas_us, "kernel": {},
               "read_floor_us": rows_out * inputs * weight.element_size() / bandwidth * 1e6}  # fmt: skip
        with dispatch.row_product_kernels():
            for block_n, warps in BLOCKS:

                def call(b: int = block_n, w: int = warps) -> torch.Tensor:
                    return row_product(x, weight, silu_mul=silu_mul, block_n=b, num_warps=w)

                err = (call().double() - exact).abs().max().item()
                floor = 1e-2 * max(exact.abs().max().item(), 1.0) if dtype != torch.float32 else 1e-6
                micros = graphed_call_seconds(call, args.calls, args.repeats, device) * 1e6
                row["kernel"][f"{block_n} rows, {warps} warps"] = {
                    "us": micros, "cublas_over_kernel": row["cublas_us"] / micros, "max_err": err,
                    "within_rule": err <= 2 * base_err + floor,
                }  # fmt: skip
    return row


def table(result: dict[str, Any]) -> list[str]:
    lines = [f"one-row products, {result['dtype']} on {result['device']}, {result['calls']} calls a graph, medians of "
             f"{result['repeats']} replays, us a call (cuBLAS / kernel)"]  # fmt: skip
    heads = list(result["rows"][0]["kernel"])
    lines.append(f"{'product':<32}{'floor':>7}{'cuBLAS':>8}" + "".join(f"{h:>22}" for h in heads))
    for row in result["rows"]:
        cells = "".join(
            f"{k['us']:>9.2f} ({k['cublas_over_kernel']:.2f}x){'' if k['within_rule'] else ' ERR':>5}"
            for k in row["kernel"].values()
        )
        lines.append(f"{row['shape']:<32}{row['read_floor_us']:>7.2f}{row['cublas_us']:>8.2f}{cells}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=30, help="calls captured in one graph (a layer's product, 30 layers)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, the interpreter, 1 x 1")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        args.calls, args.repeats = 1, 1
    if device.type == "cpu":
        import os

        os.environ[dispatch.BACKEND_ENV] = "triton"  # the kernel in the interpreter (TRITON_INTERPRET=1)
    bandwidth = copy_bandwidth(device)
    rows = [measure(s, args, device, dtype, bandwidth) for s in (QUICK_SHAPES if args.quick else SHAPES)]
    result = {**run_header("row_products.py", sys.argv[1:] if argv is None else argv, device, dtype),
              "calls": args.calls, "repeats": args.repeats, "copy_bytes_per_s": bandwidth, "rows": rows}  # fmt: skip
    write_result(result, args.out / "row_products.json", table(result))
    return result


if __name__ == "__main__":
    main()
