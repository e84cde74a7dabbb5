"""The routing section of the suite: the share of bounded prefill time spent updating the banks.

The issue's target is bank updates <= 15% of bounded prefill time. Two estimates:

- ``sync_hook``: ``coda_gqa_l.attention.route_chunk`` and ``route_chunk_triton`` and
  ``coda_gqa_l.routing_ahead.route_chunk_triton`` (the layer's routing entry points: the reference and
  the fused kernel, in turn or ahead on a side stream, one call per chunk) are wrapped so
  that each call synchronizes the device before and after and adds its wall time; the prefill
  is timed with the hook in place. Exact on the CPU; on CUDA it removes the
  overlap between routing and the rest, so it is an upper bound.
- ``profiler`` (CUDA only): a ``torch.profiler`` trace of one prefill, with each routing call
  inside a ``record_function`` range; the share is the device time of the kernels launched in
  those ranges over the device time of all kernels. Kernels whose names mention routing or banks
  are summed too (``named_kernel_share``), for Triton kernels launched outside the hook. Both sum kernel
  times: where routing runs on a side stream beside the attention (``routing_ahead.py``) they count time
  the prefill does not wait for. ``exposed_share`` counts only the time in which a routing kernel runs and
  no other kernel does, over the span from the first kernel's start to the last one's end: the part of the
  prefill's time that routing alone holds up.

On CUDA the suite's prefill row runs ``CapturedPrefill`` (graphs, each chunk's routing pipelined on side streams):
``captured_named_kernel_share`` and ``captured_exposed_share`` are the same estimates for one of its calls.
``captured_marginal_share`` is what routing adds to that prefill's time, measured: ``1 - T_without / T_with``, medians
of calls alternating between the prefill and one captured with the routing kernel left out (its outputs are wrong:
timing only). It counts what the routing's programs take from the kernels beside them (the multiprocessors they
hold), which the exposed share leaves out, and none of its kernel time that other work hides, which the kernel
share counts.

If the layer stops calling routing through these names the hook sees no calls and the row says
so: update ``ROUTING_ENTRIES`` then.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from bench_common import (
    Deadline,
    Settings,
    Shape,
    error_fields,
    routing_left_out,
    skipped,
    synchronize,
    time_once_ms,
)
from suite_layers import DEADLINE_REASON, bounded_layer, build, random_tokens

import coda_gqa_l.attention as attention_module
import coda_gqa_l.routing_ahead as routing_ahead_module
from coda_gqa_l import BoundedCoDAAttention

# (module, name): where the layer looks its routing up; a prefill routing ahead calls the kernel from routing_ahead
ROUTING_ENTRIES = (
    (attention_module, "route_chunk"),
    (attention_module, "route_chunk_triton"),
    (routing_ahead_module, "route_chunk_triton"),
)
RANGE_NAME = "coda::route_chunk"
MARGINAL_ROUNDS = 7  # calls with and without routing, alternating
ROUTING_KERNEL_NAMES = re.compile(r"rout|bank", re.IGNORECASE)


@contextmanager
def routing_hook(device: str, synchronized: bool) -> Iterator[dict[str, float]]:
    """Wrap the layer's routing entry point; yields ``{"calls", "seconds"}`` filled as it runs."""
    originals = {(module, name): getattr(module, name) for module, name in ROUTING_ENTRIES}
    tally = {"calls": 0.0, "seconds": 0.0}

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tally["calls"] += 1
            with torch.profiler.record_function(RANGE_NAME):
                if synchronized:
                    synchronize(device)
                began = time.perf_counter()
                result = original(*args, **kwargs)
                if synchronized:
                    synchronize(device)
                tally["seconds"] += time.perf_counter() - began
            return result

        return wrapped

    for (module, name), original in originals.items():
        setattr(module, name, wrap(original))
    try:
        yield tally
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)


def _prefill(layer: BoundedCoDAAttention, x: torch.Tensor, settings: Settings) -> float:
    began = time.perf_counter()
    layer.prefill_chunked(x, layer.init_state(1), settings.block_size, return_outputs=False)
    synchronize(settings.device)
    return time.perf_counter() - began


def _profiled_shares(layer: BoundedCoDAAttention, x: torch.Tensor, settings: Settings) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    with (
        routing_hook(settings.device, synchronized=False),
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
    ):
        _prefill(layer, x, settings)
    return _kernel_shares(prof.events())


def _captured_shares(layer: BoundedCoDAAttention, x: torch.Tensor, settings: Settings) -> dict[str, Any]:
    """The named-kernel and exposed shares of one ``CapturedPrefill`` call (the suite's prefill row for CUDA):
    its routing runs on side streams inside the graphs, beside the pieces' other work, and no hook sees it."""
    from torch.profiler import ProfilerActivity, profile

    from coda_gqa_l.captured_prefill import CapturedPrefill

    prefill = CapturedPrefill(layer)  # as the suite's prefill row runs it
    prefill(x, return_outputs=False)  # captures
    synchronize(settings.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill(x, return_outputs=False)
        synchronize(settings.device)
    shares = _kernel_shares(prof.events())
    keep = ("named_kernel_share", "exposed_share", "profiled_span_ms", "profiled_kernel_ms")
    return {f"captured_{key}": shares[key] for key in keep} | _marginal_share(prefill, layer, x, settings)


def _marginal_share(prefill: Any, layer: BoundedCoDAAttention, x: torch.Tensor, settings: Settings) -> dict[str, Any]:
    """``captured_marginal_share``: 1 - (time without routing) / (time with it), the captured prefill timed against
    one whose graphs were captured with the routing launch left out (the module's docstring)."""
    from coda_gqa_l.captured_prefill import CapturedPrefill

    unrouted = CapturedPrefill(layer)
    first = min(x.shape[1] // layer.config.segment * layer.config.segment, unrouted.chunk)
    if unrouted.pieces_for(first, layer.config.num_sink > 0) < 2:
        return {"captured_marginal_share": None}  # one piece: the routing runs on the caller's stream, not apart
    with routing_left_out():
        unrouted(x, return_outputs=False)  # captured without the routing
    with_ms: list[float] = []
    without_ms: list[float] = []
    for _ in range(MARGINAL_ROUNDS):
        with_ms.append(time_once_ms(lambda: prefill(x, return_outputs=False), settings.device))
        without_ms.append(time_once_ms(lambda: unrouted(x, return_outputs=False), settings.device))
    with_median, without_median = statistics.median(with_ms), statistics.median(without_ms)
    return {
        "captured_marginal_share": 1 - without_median / with_median,
        "captured_ms": with_median,
        "captured_without_routing_ms": without_median,
    }


def _kernel_shares(events: Any) -> dict[str, Any]:
    """Routing's shares of a profiled prefill's kernels (the module's docstring says which is which)."""
    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.name != RANGE_NAME]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    routing_us = sum(e.device_time_total for e in events if e.name == RANGE_NAME and e.device_type == DeviceType.CPU)
    named_us = sum(e.time_range.elapsed_us() for e in kernels if ROUTING_KERNEL_NAMES.search(e.name))
    routing = [(e.time_range.start, e.time_range.end) for e in kernels if ROUTING_KERNEL_NAMES.search(e.name)]
    others = [(e.time_range.start, e.time_range.end) for e in kernels if not ROUTING_KERNEL_NAMES.search(e.name)]
    span_us = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels) if kernels else 0
    alone_us = covered(routing) - overlap(routing, others)
    # some torch versions attribute no device time to CPU ranges: 0 there means "unknown", not "free"
    return {
        "profiler_share": routing_us / total_us if total_us and routing_us else None,
        "named_kernel_share": named_us / total_us if total_us and named_us else None,
        "exposed_share": alone_us / span_us if span_us and routing else None,
        "profiled_span_ms": span_us / 1e3,
        "profiled_kernel_ms": total_us / 1e3,
    }


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``(start, end)`` intervals as sorted disjoint intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals."""
    return sum(end - start for start, end in _merged(intervals))


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the time covered by both ``a`` and ``b`` (the intersection of their unions)."""
    total, ua, ub = 0.0, _merged(a), _merged(b)
    i = j = 0
    while i < len(ua) and j < len(ub):
        low, high = max(ua[i][0], ub[j][0]), min(ua[i][1], ub[j][1])
        total += max(0.0, high - low)
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    return total


def routing_share(shape: Shape, config: str, length: int, settings: Settings, deadline: Deadline) -> dict[str, Any]:
    """One bounded prefill of ``length`` tokens, timed plain, with the hook, and profiled."""
    row: dict[str, Any] = {"section": "routing", "shape": shape.name, "method": f"bounded-{config}", "length": length}
    if deadline.section_expired():
        return row | skipped(DEADLINE_REASON)
    try:
        layer = build(lambda: bounded_layer(shape, config), settings)
        assert isinstance(layer, BoundedCoDAAttention)
        x = random_tokens(shape, length, settings)
        with torch.inference_mode():
            plain_s = _prefill(layer, x, settings)  # warm-up, and the time without any hook
            with routing_hook(settings.device, synchronized=True) as tally:
                hooked_s = _prefill(layer, x, settings)
            row |= {"status": "ok", "prefill_s": plain_s, "hooked_prefill_s": hooked_s, "routing_calls": tally["calls"]}
            if not tally["calls"]:
                entries = ", ".join(f"{module.__name__}.{name}" for module, name in ROUTING_ENTRIES)
                row["note"] = f"no call went through {entries}: update ROUTING_ENTRIES"
            row["sync_hook_share"] = tally["seconds"] / hooked_s if tally["calls"] else None
            if settings.cuda:
                row |= _profiled_shares(layer, x, settings)
                row |= _captured_shares(layer, x, settings)
    except Exception as exc:
        row |= error_fields(exc)
    return row
