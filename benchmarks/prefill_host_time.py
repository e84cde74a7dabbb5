"""Where the host's time goes in one captured prefill call of the 7B layer (``CapturedPrefill``), against the GPU's.

    PYTHONPATH=src python benchmarks/prefill_host_time.py [--lengths 2048] [--calls 50] [--out DIR]

At 2K the captured prefill's graph runs about 0.7 ms and the whole call about 1.1 ms: the rest is the host issuing
work while the GPU waits (benchmarks/PLAN.md, twentieth session). Each call here starts on an idle GPU (a
synchronisation before it) and is timed twice: on the host's clock from the call to its return, without waiting for
the GPU (what the host spends: Python, checks, allocations, launches), and with CUDA events (the call as the GPU
sees it). The host's part is split by wrapping the steps of a call in timers: the fresh state (``layer.init_state``),
the checks before the first chunk, the state's copy into the graph's buffers (``_adopt``), the input copy and graph
launch (``_run``), the state's copy out (``_give_back``), and what is left (the output's allocation and copy). The
bare GQA layer's host time is measured the same way, and ``prefill(x)`` (a fresh state made inside: ``captured, no
state``). Medians over ``--calls``; prints a table, writes
``prefill_host_time.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_gqa import BareGQA  # noqa: E402
from captured_prefill import _DEFAULT_CHUNK, _takes_no_state, seven_b_layer  # noqa: E402

from coda_gqa_l import state as state_module  # noqa: E402
from coda_gqa_l.captured_prefill import CapturedPrefill  # noqa: E402
from coda_gqa_l.differential import finite_checked_upstream  # noqa: E402

STEPS = ("init_state", "_adopt", "_run", "_give_back")


@contextmanager
def timed_steps(prefill: CapturedPrefill, spent: dict[str, float]) -> Iterator[None]:
    """While inside, the host microseconds of each of ``STEPS`` are added to ``spent`` (wrappers on the instances)."""
    owners: dict[str, Any] = {"init_state": prefill.layer}
    originals = {}
    for name in STEPS:
        owner = owners.get(name, prefill)
        original = getattr(owner, name)
        originals[name] = (owner, original)

        def wrapper(*args: Any, _f: Callable[..., Any] = original, _n: str = name, **kwargs: Any) -> Any:
            begin = time.perf_counter_ns()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_n] = spent.get(_n, 0.0) + (time.perf_counter_ns() - begin) / 1e3

        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for name, (owner, _) in originals.items():
            delattr(owner, name)  # the instance attribute goes; the class's method shows again


def host_and_device_us(run: Callable[[], object]) -> tuple[float, float]:
    """One call from an idle GPU: the host's microseconds to return, and the GPU's from its events."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    begin = time.perf_counter_ns()
    run()
    host = (time.perf_counter_ns() - begin) / 1e3
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--chunk", type=int, default=_DEFAULT_CHUNK, help="tokens a captured step takes")
    parser.add_argument("--pieces", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    layer = seven_b_layer()
    with torch.device("cuda"):
        bare = BareGQA(4096, 32, 8, 128).to(torch.bfloat16).eval()
    prefill = CapturedPrefill(layer, chunk=args.chunk, pieces=args.pieces)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode(), finite_checked_upstream():
        for length in args.lengths:
            x = torch.randn(1, length, 4096, device="cuda", dtype=torch.bfloat16)
            runs = [("bare GQA", lambda x=x: bare(x)), ("captured", lambda x=x: prefill(x, layer.init_state(1)))]
            if _takes_no_state():
                runs.append(("captured, no state", lambda x=x: prefill(x)))
            for name, run in runs:
                for _ in range(3):  # compiles, captures, warms the allocator
                    run()
                hosts, devices, parts = [], [], []
                for _ in range(args.calls):
                    spent: dict[str, float] = {}
                    with timed_steps(prefill, spent):
                        host, device = host_and_device_us(run)
                    hosts.append(host)
                    devices.append(device)
                    parts.append(spent)
                row: dict[str, Any] = {"length": length, "variant": name, "host_us": statistics.median(hosts),
                                       "device_us": statistics.median(devices)}  # fmt: skip
                if name.startswith("captured"):
                    for step in STEPS:
                        row[step + "_us"] = statistics.median(p.get(step, 0.0) for p in parts)
                    row["rest_us"] = row["host_us"] - sum(row[s + "_us"] for s in STEPS)
                rows.append(row)
            del x
    device = torch.cuda.get_device_name()
    flag = state_module.ONE_LAUNCH_STATE_COPIES
    print(f"7B layer, medium banks, bf16, batch 1; {device}; one-launch state copies {'on' if flag else 'off'}; "
          f"medians of {args.calls} calls, each from an idle GPU")  # fmt: skip
    print("| tokens | variant | host us | GPU us (events) | " + " | ".join(f"{s} us" for s in STEPS) + " | rest us |")
    print("|---|---|---|---|" + "---|" * (len(STEPS) + 1))
    for r in rows:
        steps = " | ".join(f"{r[s + '_us']:.0f}" if s + "_us" in r else "" for s in (*STEPS, "rest"))
        print(f"| {r['length']:,} | {r['variant']} | {r['host_us']:.0f} | {r['device_us']:.0f} | {steps} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "prefill_host_time.json"
    meta = {"device": device, "torch": torch.__version__, "one_launch_state_copies": flag, "calls": args.calls}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
