"""Where a segment's time goes inside the fused routing kernel: each program's cycle counter stamped at the end of
every phase of every segment (``route_chunk_triton(phase_stamps=...)``), for the shapes of benchmarks/routing_kernel.py.

    PYTHONPATH=src python benchmarks/routing_phases.py [--launches 20] [--out DIR]
    TRITON_INTERPRET=1 CODA_GQA_L_KERNELS=triton PYTHONPATH=src python benchmarks/routing_phases.py --quick
        # CPU: a tiny shape in Triton's interpreter, the plumbing only (its stamps are zeros)

The kernel runs a serial chain per bank and head (the exact and the summary bank), with a key follower a segment
behind each (on by default). Each of ``--launches`` launches routes one 1,024-token chunk from banks already filled
(routing_kernel.Problem); each program's phases are the cycles between consecutive stamps (``%clock64``, after a
barrier, so a phase ends when its slowest warp does), and "to the next segment" the cycles from a segment's last
stamp to the next one's first. Medians over launches, heads and segments (the first segment left out: it reads the
input banks, not a snapshot). Cycles are converted to microseconds with the clock the stamped launches imply (the
summary chain's cycles from its first stamp to its last over a launch's event-timed length, the launches queued
back to back so the host's time between them does not count: a lower bound on the clock). The stamps add a barrier
a phase, so a stamped segment is a little longer than an unstamped one (benchmarks/routing_kernel.py gives those).
Prints a table; writes ``DIR/routing_phases.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from coda_gqa_l.config import chunk_segments
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.routing import phase_stamp_buffer, route_chunk_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import quick_or_cuda, run_header, write_result  # noqa: E402
from routing_kernel import QUICK_SHAPES, SHAPES, Problem  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the phases each program stamps (routing_triton: ``_stamp(stamps, e, k, ...)`` at the end of phase k)
PHASES = {
    "exact chain": ["token-bank dots and cosines", "decisions", "row copies and publish", "bias store and barrier"],
    "summary chain": [
        "token-bank dots and cosines",
        "seeding",
        "assignment and weights",
        "EMA rows",
        "gate EMA, bias store and barrier",
    ],  # fmt: skip
    "exact keys": ["waiting for the chain", "key rows"],
    "summary keys": ["waiting for the chain", "key rows"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=20, help="stamped launches per shape")
    p.add_argument("--quick", action="store_true", help="CPU, a tiny shape, Triton's interpreter (stamps are zeros)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "routing_phases")
    return p.parse_args(argv)


def phase_cycles(stamps: torch.Tensor) -> dict[str, dict[str, list[int]]]:
    """Each program's cycles a phase, one entry per head and segment (the first segment left out), and to the next
    segment: from ``stamps (rows, 4, nseg, slots)`` of one launch."""
    out: dict[str, dict[str, list[int]]] = {}
    for program, (name, phases) in enumerate(PHASES.items()):
        taken = stamps[:, program, :, : len(phases) + 1].cpu()
        deltas = taken.diff(dim=-1)[:, 1:]  # (rows, segments after the first, phases)
        per = {phase: deltas[..., k].flatten().tolist() for k, phase in enumerate(phases)}
        per["to the next segment"] = (taken[:, 1:, 0] - taken[:, :-1, -1])[:, 1:].flatten().tolist()
        out[name] = per
    return out


def stamped_rows(shape: Any, launches: int, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Each program's median cycles a phase over ``launches`` stamped launches of ``shape``'s chunk, and the
    launches' event-timed length (queued back to back)."""
    problem = Problem(shape, shape.config, device, dtype)
    k, v, g = (x.contiguous() for x in problem.ext(problem.start))
    nseg = len(chunk_segments(problem.start, shape.chunk, shape.config.segment))
    stamps = phase_stamp_buffer(shape.kv_heads, nseg, device=device)

    def launch() -> torch.Tensor:
        stamps.zero_()
        route_chunk_triton(problem.banks, k, v, g, start=problem.start, n=shape.chunk, eta=problem.eta,
                           config=shape.config, phase_stamps=stamps)  # fmt: skip
        return stamps.clone()

    with torch.no_grad(), dispatch.key_followers(True):
        launch()  # compiles
        timing = device.type == "cuda"
        begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2)) if timing else (None, None)
        if begin is not None:
            begin.record()
        taken = [launch() for _ in range(launches)]
        launch_us = None
        if begin is not None and end is not None:
            end.record()
            end.synchronize()
            launch_us = begin.elapsed_time(end) * 1e3 / launches
    cycles: dict[str, dict[str, list[int]]] = {}
    chain_cycles: list[int] = []
    for one in taken:
        summary = one[:, 1, :, :6]
        chain_cycles.append(int((summary[:, -1, -1] - summary[:, 0, 0]).max()))
        for program, per in phase_cycles(one).items():
            for phase, values in per.items():
                cycles.setdefault(program, {}).setdefault(phase, []).extend(values)
    mhz = statistics.median(chain_cycles) / launch_us if launch_us and any(chain_cycles) else 0.0
    rows: list[dict[str, Any]] = []
    for program, per in cycles.items():
        for phase, values in per.items():
            median = statistics.median(values) if values else 0.0
            rows.append({"shape": shape.name, "program": program, "phase": phase, "median_cycles": median,
                         "median_us": median / mhz if mhz else None, "samples": len(values)})  # fmt: skip
    rows.append({"shape": shape.name, "program": "launch", "phase": "event-timed", "median_cycles": None,
                 "median_us": launch_us, "samples": launches, "clock_mhz_lower_bound": mhz})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = quick_or_cuda(args.quick, "routing_phases.py reads a GPU's cycle counters")
    if where is None:
        return 1
    device, dtype = where
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.launches = 1
    rows = [row for shape in shapes for row in stamped_rows(shape, args.launches, device, dtype)]
    result = run_header("routing_phases.py", argv if argv is not None else sys.argv[1:], device, dtype)
    result.update(launches=args.launches, rows=rows)
    table = [f"routing phases, {result['device']}, {result['dtype']}, medians over {args.launches} launches, heads "
             "and segments"]  # fmt: skip
    table.append(f"{'shape':30} {'program':14} {'phase':34} {'cycles':>9} {'us':>8}")
    for row in rows:
        cyc = "" if row["median_cycles"] is None else f"{row['median_cycles']:9.0f}"
        us = "" if row["median_us"] is None else f"{row['median_us']:8.2f}"
        table.append(f"{row['shape'][:30]:30} {row['program']:14} {row['phase'][:34]:34} {cyc:>9} {us:>8}")
    write_result(result, args.out / "routing_phases.json", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
