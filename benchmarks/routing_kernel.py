"""The fused routing kernel alone on the GPU: one 1,024-token prefill chunk through both banks, through the exact
bank only and through the summary bank only, so the serial chain that bounds a chunk's routing shows itself.

    PYTHONPATH=src python benchmarks/routing_kernel.py [--out DIR] [--calls 30] [--repeats 20]
    TRITON_INTERPRET=1 CODA_GQA_L_KERNELS=triton PYTHONPATH=src python benchmarks/routing_kernel.py --quick
        # CPU: tiny shapes in Triton's interpreter, plain loops (the test runs this; no timing worth reading)

The kernel runs one program per (batch, KV head, bank), each walking the chunk's segments in order, so its time is
the longer of the two banks' chains, not their sum: the exact-only and summary-only rows say which chain that is.
Shapes: SmolLM2-135M in the neural database's shipped config (3 KV heads, head dim 64, window 256, segment 64, 4
sinks, 60 exact and 64 summary slots) and one 7B-shaped layer in the medium preset (8 KV heads, head dim 128). The
banks are filled by routing four chunks first; values lie around a few directions (so hits, inserts and EMA updates
happen) and the gates are uniform (half the tokens are exact-bank candidates: the decision work does not depend on
how many pass). ``--warps 4 8 16`` times each program width (the results do not depend on it). Each row's
``--calls`` launches (a model's layers) are captured in one CUDA graph and replayed ``--repeats`` times; figures are
medians per launch and per segment. ``--keys`` picks how the key rows are written, each timed: ``chain`` inside
each bank's serial chain, ``followers`` by programs of their own a segment behind it (``dispatch.key_followers``;
no decision reads a key), ``none`` not at all (``route_chunk_triton(write_keys=False)``: wrong snapshots, the bound
on what taking them off the chain can give). ``--banks-at empty`` also times the chunk right after the first window
from empty banks, as a document's first chunk routes: the summary chain seeds its prototypes one at a time there,
which the filled banks never do (each launch starts again from the same banks). Prints a table last; writes
``DIR/routing_kernel.json``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from coda_gqa_l.config import BoundedConfig, chunk_segments
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.routing import route_chunk_triton
from coda_gqa_l.kernels.routing_reference import Banks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import graphed_call_seconds, quick_or_cuda, run_header, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = BoundedConfig(window=256, num_landmarks_exact=60, num_landmarks_summary=64, num_sink=4, segment=64,
                        novelty=0.9, match=0.97, max_inserts=16)  # fmt: skip
MEDIUM = BoundedConfig.preset("medium")


@dataclass(frozen=True)
class Shape:
    name: str
    kv_heads: int
    head_dim: int
    config: BoundedConfig
    chunk: int


SHAPES = [Shape("SmolLM2-135M, database config", 3, 64, SMOLLM2, 1024), Shape("7B layer, medium", 8, 128, MEDIUM, 1024)]
QUICK_SHAPES = [
    Shape("tiny", 2, 16, BoundedConfig(window=32, segment=8, num_landmarks_exact=6, num_landmarks_summary=5), 64)
]
BANK_SPLITS = {
    "both banks": lambda c: c,
    "exact bank only": lambda c: replace(c, num_landmarks_summary=0),
    "summary bank only": lambda c: replace(c, num_landmarks_exact=0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "routing_kernel")
    p.add_argument("--calls", type=int, default=30, help="launches per captured graph (a model's layers)")
    p.add_argument("--repeats", type=int, default=20, help="replays timed per row")
    p.add_argument("--warps", type=int, nargs="+", default=[8], help="warps per program, each timed (8: the kernel's)")
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, Triton's interpreter, plain loops")
    p.add_argument(
        "--keys",
        nargs="+",
        choices=["chain", "followers", "none"],
        default=["chain", "followers"],
        help="where the key rows are written: in the chains, by follower programs, or nowhere (a bound: wrong keys)",
    )
    p.add_argument(
        "--banks-at",
        nargs="+",
        choices=["filled", "empty"],
        default=["filled"],
        help="banks filled by four chunks first, or empty (a document's first chunk after the window)",
    )
    return p.parse_args(argv)


class Problem:
    """A token stream for one layer's routing and the banks after its first chunks."""

    def __init__(
        self,
        shape: Shape,
        config: BoundedConfig,
        device: torch.device,
        dtype: torch.dtype,
        warps: int = 8,
        filled: bool = True,
    ) -> None:
        self.shape, self.config, self.warps = shape, config, warps
        self.keys = "chain"  # the banks below are routed with keys; timed runs pick how (--keys)
        gen = torch.Generator(device="cpu").manual_seed(0)
        H, D, n = shape.kv_heads, shape.head_dim, shape.chunk
        length = config.window + 5 * n
        directions = torch.nn.functional.normalize(torch.randn(12, D, generator=gen), dim=-1)
        pick = torch.randint(0, 12, (1, H, length), generator=gen)
        self.k = torch.randn(1, H, length, D, generator=gen).to(device, dtype)
        self.v = (directions[pick] + 0.15 * torch.randn(1, H, length, D, generator=gen)).to(device, dtype)
        self.g = torch.rand(1, H, length, generator=gen).to(device)
        self.eta = torch.full((H,), 0.05, device=device)
        Me, Ms = config.num_landmarks_exact, config.num_landmarks_summary
        self.banks = Banks(
            torch.zeros(1, H, Me, D, device=device, dtype=dtype), torch.zeros(1, H, Me, D, device=device, dtype=dtype),
            torch.ones(1, H, Me, device=device), torch.zeros(1, H, Me, dtype=torch.long, device=device),
            torch.zeros(1, H, Me, dtype=torch.bool, device=device),
            torch.zeros(1, H, Ms, D, device=device, dtype=dtype), torch.zeros(1, H, Ms, D, device=device, dtype=dtype),
            torch.ones(1, H, Ms, device=device), torch.zeros(1, H, Ms, dtype=torch.bool, device=device),
        )  # fmt: skip
        if filled:
            for start in range(0, 4 * n, n):
                self.banks = self.route(start)[0]
        # empty banks: the chunk after the first window, whose every segment routes (into banks filling up)
        self.start = 4 * n if filled else config.window

    def ext(self, start: int) -> tuple[torch.Tensor, ...]:
        """The window before ``start`` and the chunk from it (zeros before the stream), as the layer passes them."""
        W, n = self.config.window, self.shape.chunk
        pad = W  # the stream is stored from index W on, zeros before it
        return tuple(x[:, :, pad + start - W : pad + start + n] for x in (self.k, self.v, self.g))

    def route(self, start: int) -> tuple[Any, ...]:
        k, v, g = self.ext(start)
        return route_chunk_triton(
            self.banks, k.contiguous(), v.contiguous(), g.contiguous(), start=start, n=self.shape.chunk,
            eta=self.eta, config=self.config, num_warps=self.warps,
        )  # fmt: skip


def time_route(problem: Problem, calls: int, repeats: int) -> float:
    """Median seconds per launch: a graph of ``calls`` launches replayed (on the CPU: plain loops)."""
    k, v, g = (x.contiguous() for x in problem.ext(problem.start))

    def launch() -> None:
        with dispatch.key_followers(problem.keys == "followers"):
            route_chunk_triton(problem.banks, k, v, g, start=problem.start, n=problem.shape.chunk, eta=problem.eta,
                               config=problem.config, num_warps=problem.warps,
                               write_keys=problem.keys != "none")  # fmt: skip

    with torch.no_grad():
        launch()  # compiles
        return graphed_call_seconds(launch, calls, repeats, k.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = quick_or_cuda(args.quick, "routing_kernel.py times a CUDA kernel")
    if where is None:
        return 1
    device, dtype = where
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.calls, args.repeats = 1, 1
    rows = []
    for shape in shapes:
        for split, make in BANK_SPLITS.items():
            for warps in args.warps:
                for banks_at in args.banks_at:
                    config = make(shape.config)
                    problem = Problem(shape, config, device, dtype, warps, filled=banks_at == "filled")
                    for keys in args.keys:
                        problem.keys = keys
                        seconds = time_route(problem, args.calls, args.repeats)
                        segments = len(chunk_segments(problem.start, shape.chunk, config.segment))
                        rows.append({"shape": shape.name, "banks": split, "banks_at": banks_at, "warps": warps,
                                     "keys": keys, "segments": segments, "launch_us": seconds * 1e6,
                                     "segment_us": seconds * 1e6 / segments})  # fmt: skip
    result = run_header("routing_kernel.py", argv if argv is not None else sys.argv[1:], device, dtype)
    result.update(calls=args.calls, repeats=args.repeats, rows=rows)
    table = [f"routing one chunk, {result['device']}, {result['dtype']}, medians of {args.repeats} replays"]
    table.append(
        f"{'shape':32} {'banks':18} {'from':>6} {'warps':>5} {'keys':>9} {'segments':>8} {'launch us':>10} "
        f"{'per segment us':>15}"
    )
    for row in rows:
        table.append(
            f"{row['shape']:32} {row['banks']:18} {row['banks_at']:>6} {row['warps']:5d} {row['keys']:>9} "
            f"{row['segments']:8d} {row['launch_us']:10.1f} {row['segment_us']:15.2f}"
        )
    write_result(result, args.out / "routing_kernel.json", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
