"""Where a bounded layer's GPU prefill spends its time, with routing in turn and routing ahead on a side stream.

    PYTHONPATH=src python benchmarks/prefill_timeline.py [--length 32768] [--block-size 4096] [--out DIR]

For each variant (routing in turn, the default; routing ahead; routing ahead with the key rows written inside the
routing chains instead of by follower programs; routing ahead on a stream of normal priority) one 7B-shaped bfloat16
layer (``medium`` banks) prefills ``--length`` random tokens: the median wall time of ``--repeats`` runs (CUDA
events), then one run under ``torch.profiler``, whose kernels are grouped (routing, attention, matrix products, the
rest) with each group's kernel count, summed time and mean time per kernel, and the time in which routing runs alone.
A routing kernel that runs beside the attention yet takes longer than alone shows here as a longer mean. Prints a
table, writes ``prefill_timeline.json`` to ``--out`` (``--trace``: each variant's profiled run as a Chrome trace).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_routing import covered, overlap  # noqa: E402

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig, routing_ahead  # noqa: E402
from coda_gqa_l.kernels import dispatch  # noqa: E402

GROUPS = {
    "routing": re.compile(r"rout", re.IGNORECASE),
    "attention": re.compile(r"attn|_fwd_kernel|diff_att", re.IGNORECASE),
    "products": re.compile(r"gemm|cutlass|sm90_|nvjet|cublas", re.IGNORECASE),
}
VARIANTS = {
    "in turn": dict(ahead=False, followers=True, priority=-1),
    "ahead": dict(ahead=True, followers=True, priority=-1),
    "ahead, keys in chains": dict(ahead=True, followers=False, priority=-1),
    "ahead, normal priority": dict(ahead=True, followers=True, priority=0),
}


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS.items() if pattern.search(name)), "other")


def time_runs(run: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return times


def profile_groups(run: Any, trace: Path | None = None) -> dict[str, Any]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    if trace is not None:  # every kernel with its stream, for a timeline (chrome://tracing, Perfetto)
        prof.export_chrome_trace(str(trace))
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = {g: [(e.time_range.start, e.time_range.end) for e in kernels if group_of(e.name) == g] for g in
             (*GROUPS, "other")}  # fmt: skip
    rest = [s for g, v in spans.items() if g != "routing" for s in v]
    first = min(e.time_range.start for e in kernels)
    last = max(e.time_range.end for e in kernels)
    out: dict[str, Any] = {"span_ms": (last - first) / 1e3}
    for group, intervals in spans.items():
        total = sum(end - start for start, end in intervals)
        out[group] = {"kernels": len(intervals), "sum_ms": total / 1e3,
                      "mean_us": total / len(intervals) if intervals else 0.0}  # fmt: skip
    out["routing_alone_ms"] = (covered(spans["routing"]) - overlap(spans["routing"], rest)) / 1e3
    out["others_busy_ms"] = covered(rest) / 1e3
    out["kernel_names"] = sorted({e.name[:80] for e in kernels})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--trace", action="store_true", help="also write each variant's profiled run as a trace")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BoundedConfig(window=256, num_landmarks_exact=64, num_landmarks_summary=64)
    with torch.device("cuda"):
        layer = BoundedCoDAAttention(4096, 32, 8, head_dim=128, config=config).to(torch.bfloat16).eval()
    x = torch.randn(1, args.length, 4096, device="cuda", dtype=torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    with torch.inference_mode():
        for name, variant in VARIANTS.items():
            routing_ahead.PRIORITY = variant["priority"]
            with dispatch.routing_ahead(variant["ahead"]), dispatch.key_followers(variant["followers"]):

                def run() -> None:
                    layer.prefill_chunked(x, layer.init_state(1), args.block_size)

                time_runs(run, 2)  # compiles, warms the allocator
                times = time_runs(run, args.repeats)
                trace = args.out / f"trace_{name.replace(' ', '_').replace(',', '')}.json" if args.trace else None
                rows[name] = {"median_ms": statistics.median(times), "times_ms": times, **profile_groups(run, trace)}
    device = torch.cuda.get_device_name()
    connections = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "unset")
    print(f"7B layer, medium banks, bf16, {args.length:,} tokens in chunks of {args.block_size:,}; {device}; "
          f"CUDA_DEVICE_MAX_CONNECTIONS {connections}")  # fmt: skip
    head = "| variant | median ms | tok/s | routing kernels: n / sum ms / mean us | attention ms | products ms | "
    print(head + "other ms | routing alone ms | profiled span ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        rt = r["routing"]
        tps = args.length / r["median_ms"] * 1e3 / 1e6
        print(f"| {name} | {r['median_ms']:.2f} | {tps:.3f}M | {rt['kernels']} / {rt['sum_ms']:.2f} / "
              f"{rt['mean_us']:.0f} | {r['attention']['sum_ms']:.2f} | {r['products']['sum_ms']:.2f} | "
              f"{r['other']['sum_ms']:.2f} | {r['routing_alone_ms']:.2f} | {r['span_ms']:.2f} |")  # fmt: skip
    path = args.out / "prefill_timeline.json"
    meta = {"device": device, "torch": torch.__version__, "length": args.length, "block_size": args.block_size,
            "cuda_device_max_connections": connections}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
