"""What slows a piece's products beside the routing kernel: one 7B piece's four projections timed alone and beside
kernels that run on another stream, on the GPU.

    PYTHONPATH=src python benchmarks/products_beside.py [--tokens 8192] [--rounds 7] [--out DIR]

In the captured 7B prefill the products of a piece take 4.6 ms beside the routing and 3.7 without it (chunks of
16,384, an H100: results/speed.md, "Larger chunks"), while the routing runs alone only 0.2 ms. Neither half the
routing's programs (no key followers) nor cuBLAS planned for the multiprocessors it leaves (the SM carveout) made
them faster, so holding multiprocessors may not be the cause. Each companion here is launched on a side stream just
before the products (the query, key, value and output projections of ``--tokens`` tokens, ``--repeats`` times) and
runs past them; CUDA events on the products' stream time them:

- ``alone``: nothing beside;
- ``routing``: the routing kernel of one chunk of ``--tokens`` tokens at the 7B shape (medium banks, filled first,
  ``routing_kernel.Problem``), key followers on (32 programs), as the prefill runs it;
- ``routing, keys in chains``: its 16 chain programs writing the key rows themselves;
- ``routing, no key rows``: the chains without the key rows (``write_keys=False``: half the snapshot stores gone);
- ``hold, arithmetic``: 32 programs of 8 warps that only compute in registers (multiprocessors held, no memory);
- ``hold, stores``: the same 32 programs storing 8 KiB each an iteration (multiprocessors held, memory written).

If ``hold, arithmetic`` slows the products as much as the routing does, holding multiprocessors is the cause; if only
the storing companions do, it is memory traffic. Prints a table; writes ``DIR/products_beside.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_header, write_result  # noqa: E402
from routing_kernel import MEDIUM, Problem, Shape  # noqa: E402

from coda_gqa_l.kernels import dispatch  # noqa: E402
from coda_gqa_l.kernels.routing import route_chunk_triton, routing_programs  # noqa: E402

HOLD_BLOCK = 2048  # float32 lanes a holding program works on (8 KiB a store)


@triton.jit
def _hold(out, iters, slots, STORE: tl.constexpr, BLOCK: tl.constexpr):
    """Keep one program busy for ``iters`` iterations: arithmetic in registers, and with ``STORE`` one 8 KiB store an
    iteration into one of ``slots`` rotating places of its own (the result is stored, so nothing is optimised out)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    x = lanes.to(tl.float32) * 1e-6 + pid
    for i in range(iters):
        x = x * 0.999 + 0.001
        if STORE:
            tl.store(out + ((i % slots) * tl.num_programs(0) + pid) * BLOCK + lanes, x)
    tl.store(out + pid * BLOCK + lanes, x)


def _events_ms(run: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the piece (its products' rows)")
    parser.add_argument("--repeats", type=int, default=2, help="times the four products run in one timed sample")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("products_beside.py times kernels side by side on a CUDA GPU; none is available")
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.randn(args.tokens, 4096, device=device, dtype=dtype)
    weights = [torch.randn(rows, 4096, device=device, dtype=dtype) * 0.02 for rows in (4096, 1024, 1024, 4096)]

    def products() -> None:
        for _ in range(args.repeats):
            for w in weights:
                F.linear(x, w)

    problem = Problem(Shape("7B layer, medium", 8, 128, MEDIUM, args.tokens), MEDIUM, device, dtype)
    k, v, g = (t.contiguous() for t in problem.ext(problem.start))

    def routing(followers: bool, keys: bool) -> Callable[[], None]:
        def run() -> None:
            with dispatch.key_followers(followers):
                for _ in range(2):  # two chunks: past the products
                    route_chunk_triton(problem.banks, k, v, g, start=problem.start, n=args.tokens, eta=problem.eta,
                                       config=MEDIUM, write_keys=keys)  # fmt: skip

        return run

    programs = routing_programs(1, 8, followers=True)
    slots = 64
    scratch = torch.empty(slots * programs * HOLD_BLOCK, device=device, dtype=torch.float32)

    def hold(store: bool, iters: int) -> Callable[[], None]:
        return lambda: _hold[(programs,)](scratch, iters, slots, STORE=store, BLOCK=HOLD_BLOCK, num_warps=8)

    with torch.inference_mode():
        products()
        alone_ms = statistics.median(_events_ms(products) for _ in range(3))
        # the holding programs sized to run about twice the products' time alone, from the time of two iteration
        # counts (a launch's fixed cost left out: sized from one short probe, the arithmetic one ran 0.74 ms beside
        # products of 1.83, H100, twenty-fourth session)
        iters = {}
        for store in (False, True):
            hold(store, 1000)()
            short, long = (statistics.median(_events_ms(hold(store, n)) for _ in range(3)) for n in (20_000, 80_000))
            per_iter = max((long - short) / 60_000, 1e-9)
            iters[store] = max(1000, int((2 * alone_ms - (short - 20_000 * per_iter)) / per_iter))
        companions: dict[str, Callable[[], None] | None] = {
            "alone": None,
            "routing": routing(True, True),
            "routing, keys in chains": routing(False, True),
            "routing, no key rows": routing(True, False),
            "hold, arithmetic": hold(False, iters[False]),
            "hold, stores": hold(True, iters[True]),
        }
        side = torch.cuda.Stream()
        companion_ms: dict[str, float] = {}
        for name, companion in companions.items():  # compiles; each companion's own time
            if companion is not None:
                companion()
                companion_ms[name] = statistics.median(_events_ms(companion) for _ in range(3))
        times: dict[str, list[float]] = {name: [] for name in companions}
        for _ in range(args.rounds):
            for name, companion in companions.items():
                torch.cuda.synchronize()
                if companion is not None:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        companion()
                times[name].append(_events_ms(products))
                torch.cuda.synchronize()
    base = statistics.median(times["alone"])
    rows = [
        {"companion": name, "products_ms": statistics.median(t), "times_ms": t,
         "against_alone": statistics.median(t) / base, "companion_alone_ms": companion_ms.get(name)}
        for name, t in times.items()
    ]  # fmt: skip
    table = [
        f"products of {args.tokens:,} tokens x {args.repeats} (q, k, v, o of a 7B layer), bf16; "
        f"{torch.cuda.get_device_name()}; {args.rounds} rounds, medians",
        "| beside | products ms | x alone | companion alone ms |",
        "|---|---|---|---|",
    ]
    for r in rows:
        own = "" if r["companion_alone_ms"] is None else f"{r['companion_alone_ms']:.3f}"
        table.append(f"| {r['companion']} | {r['products_ms']:.3f} | {r['against_alone']:.3f} | {own} |")
    header = run_header("products_beside.py", sys.argv[1:], device, dtype)
    write_result(header | {"tokens": args.tokens, "repeats": args.repeats, "rows": rows},
                 args.out / "products_beside.json", table)  # fmt: skip


if __name__ == "__main__":
    main()
