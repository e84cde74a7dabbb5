"""Read a Chrome trace of GPU kernels (``captured_prefill.py --trace``, ``prefill_timeline.py --trace``) and say
where the span goes: every kernel in start order (offset from the first, length, stream, name), then the span cut
into the time no kernel runs, the time only routing runs, the time routing runs beside other kernels, and the time
other kernels run without routing.

    python benchmarks/trace_gaps.py TRACE.json [--top 60] [--out FILE.json]

No GPU needed: it reads the trace file. Prints a table; with ``--out`` writes the kernels and the cut as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROUTING = re.compile(r"rout", re.IGNORECASE)


def kernels(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU kernels and copies of a Chrome trace, in start order, times in microseconds from the first."""
    events = [
        e
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    if not events:
        return []
    first = min(float(e["ts"]) for e in events)
    out = [
        {"start_us": float(e["ts"]) - first, "us": float(e.get("dur", 0.0)), "stream": e.get("args", {}).get("stream"),
         "name": e["name"], "routing": bool(ROUTING.search(e["name"]))}
        for e in events
    ]  # fmt: skip
    return sorted(out, key=lambda k: k["start_us"])


def cut(spans: list[dict[str, Any]]) -> dict[str, float]:
    """The span split by what runs: nothing, routing alone, routing beside others, others alone (microseconds)."""
    edges = sorted({k["start_us"] for k in spans} | {k["start_us"] + k["us"] for k in spans})
    parts = {"idle": 0.0, "routing alone": 0.0, "routing beside others": 0.0, "others without routing": 0.0}
    for left, right in zip(edges, edges[1:], strict=False):
        mid = (left + right) / 2
        running = [k for k in spans if k["start_us"] <= mid < k["start_us"] + k["us"]]
        routing = any(k["routing"] for k in running)
        others = any(not k["routing"] for k in running)
        key = "idle" if not running else ("routing beside others" if routing and others else
                                          "routing alone" if routing else "others without routing")  # fmt: skip
        parts[key] += right - left
    parts["span"] = edges[-1] - edges[0] if edges else 0.0
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--top", type=int, default=60, help="kernels listed (in start order); the cut covers all")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        trace = json.loads(args.trace.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"cannot read the trace {args.trace}: {err}", file=sys.stderr)
        return 2
    spans = kernels(trace)
    if not spans:
        print(f"{args.trace}: no GPU kernels in the trace", file=sys.stderr)
        return 2
    print(f"{'start us':>9} {'us':>8} {'stream':>6}  kernel")
    for k in spans[: args.top]:
        print(f"{k['start_us']:9.1f} {k['us']:8.1f} {k['stream']!s:>6}  {k['name'][:90]}")
    if len(spans) > args.top:
        print(f"... {len(spans) - args.top} more")
    parts = cut(spans)
    print("\n" + ", ".join(f"{name} {us / 1e3:.3f} ms" for name, us in parts.items()))
    if args.out is not None:
        args.out.write_text(json.dumps({"kernels": spans, "cut_us": parts}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
