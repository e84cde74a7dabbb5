"""One decode step's differential attention on the GPU: the split forward (the default for one-token steps)
against the forward's one program per head, in the same process on the same inputs.

    PYTHONPATH=src python benchmarks/decode_attention.py [--out DIR] [--calls 30] [--repeats 20]
    TRITON_INTERPRET=1 CODA_GQA_L_KERNELS=triton PYTHONPATH=src python benchmarks/decode_attention.py --quick
        # CPU: tiny shapes in Triton's interpreter, plain loops (the test runs this; no timing worth reading)

Shapes are SmolLM2-135M's (9 query heads over 3 KV heads, head dim 64, bfloat16, batch 1) in the neural database's
bounded config: the graph decoder's step reads its segment's 256-token window buffer (``k_offset=SEGMENT_WINDOW``)
and 128 extras (4 sinks, 60 exact and 64 summary slots), as in every layer of a graph-decoded answer; then full
caches of 8K and 32K keys (the plain causal pattern). Each path's ``--calls`` launches are captured in one CUDA graph
(as in the decoder, so launch overhead is the graph's) and replayed ``--repeats`` times; figures are medians per
call, the ratio a ratio of medians, and the two paths' outputs are compared. Prints a table last; writes
``DIR/decode_attention.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from bench_common import graphed_call_seconds

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.diff_attention import SEGMENT_WINDOW, Pattern, fused_attention

REPO = Path(__file__).resolve().parents[1]
# (KV heads, query heads per KV head, head dim) and the cases: name -> (pattern, position, main keys, k_offset, extras)
SHAPE = (3, 3, 64)
CASES = {
    "graph step: window buffer 256 + 128 extras": (Pattern(True, 256, 64, 4), 8192 + 37, 256, SEGMENT_WINDOW, 128),
    "full cache, 8K keys": (Pattern(), 8191, 8192, 8191, 0),
    "full cache, 32K keys": (Pattern(), 32767, 32768, 32767, 0),
}
QUICK_SHAPE = (2, 2, 16)
QUICK_CASES = {
    "graph step: window buffer 32 + 12 extras": (Pattern(True, 32, 8, 2), 64 + 5, 32, SEGMENT_WINDOW, 12),
    "full cache, 300 keys": (Pattern(), 299, 300, 299, 0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode_attention")
    p.add_argument("--calls", type=int, default=30, help="launches per captured graph (a model's layers)")
    p.add_argument("--repeats", type=int, default=20, help="replays timed per path")
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, Triton's interpreter, plain loops")
    return p.parse_args(argv)


def inputs(
    case: tuple[Pattern, int, int, int, int], shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    pattern, position, keys, k_offset, extras = case
    HKV, GROUP, HEAD_DIM = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    args: dict[str, Any] = {
        "q": rand(1, HKV, 2 * GROUP, 1, HEAD_DIM),
        "k": rand(1, HKV, keys, HEAD_DIM),
        "v": rand(1, HKV, keys, HEAD_DIM),
        "lam": 0.5 * torch.rand(1, HKV * GROUP, 1, generator=gen, device=device),
        "q_start": torch.tensor(position, device=device),
        "k_offset": k_offset,
        "scale": HEAD_DIM**-0.5,
        "pattern": pattern,
        "norm_weight": 1 + 0.1 * rand(HKV * GROUP, HEAD_DIM),
    }
    if extras:
        args["extra_k"] = rand(1, HKV, 1, extras, HEAD_DIM)
        args["extra_v"] = rand(1, HKV, 1, extras, HEAD_DIM)
        args["extra_bias"] = torch.log(torch.rand(1, HKV, 1, extras, generator=gen, device=device))
    return args


def time_path(args: dict[str, Any], calls: int, repeats: int, one_program: bool) -> tuple[float, torch.Tensor]:
    """Median seconds per call over ``repeats`` replays of a graph of ``calls`` launches (on the CPU: loops of
    ``calls`` calls), and the output."""
    context = dispatch.one_program_decode() if one_program else contextlib.nullcontext()
    with context, torch.no_grad():
        out = fused_attention(**args)  # compiles
        return graphed_call_seconds(lambda: fused_attention(**args), calls, repeats, args["q"].device), out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        if not dispatch.interpreting() or dispatch.backend("cpu") != "triton":
            print("--quick runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 CODA_GQA_L_KERNELS=triton")
            return 1
        device, dtype, shape, cases = torch.device("cpu"), torch.float32, QUICK_SHAPE, QUICK_CASES
    elif torch.cuda.is_available():
        device, dtype, shape, cases = torch.device("cuda"), torch.bfloat16, SHAPE, CASES
    else:
        print("decode_attention.py times CUDA kernels: no GPU here (--quick runs tiny shapes in the interpreter)")
        return 1
    rows = []
    for case in cases:
        problem = inputs(cases[case], shape, device, dtype)
        split_s, split_out = time_path(problem, args.calls, args.repeats, one_program=False)
        one_s, one_out = time_path(problem, args.calls, args.repeats, one_program=True)
        rows.append(
            {
                "case": case,
                "split_us": split_s * 1e6,
                "one_program_us": one_s * 1e6,
                "speedup": one_s / split_s,
                "max_abs_difference": (split_out.float() - one_out.float()).abs().max().item(),
            }
        )
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)",
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "calls": args.calls,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_attention.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"one decode step's attention, {result['device']}, {result['dtype']}, {args.calls} calls, medians")
    print(f"{'case':46} {'split us':>9} {'one program us':>15} {'speed-up':>9} {'max |diff|':>11}")
    for row in rows:
        print(
            f"{row['case']:46} {row['split_us']:9.2f} {row['one_program_us']:15.2f} {row['speedup']:8.2f}x "
            f"{row['max_abs_difference']:11.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
