"""The routing section of the suite: the share of bounded prefill time spent updating the banks.

The issue's target is bank updates <= 15% of bounded prefill time. Two estimates:

- ``sync_hook``: ``coda_gqa_l.attention.route_chunk`` and ``route_chunk_triton`` (the layer's
  routing entry points: the reference and the fused kernel, one call per chunk) are wrapped so
  that each call synchronizes the device before and after and adds its wall time; the prefill
  is timed with the hook in place. Exact on the CPU; on CUDA it removes the
  overlap between routing and the rest, so it is an upper bound.
- ``profiler`` (CUDA only): a ``torch.profiler`` trace of one prefill, with each routing call
  inside a ``record_function`` range; the share is the device time of the kernels launched in
  those ranges over the device time of all kernels. Kernels whose names mention routing or banks
  are summed too (``named_kernel_share``), for Triton kernels launched outside the hook.

If the layer stops calling routing through these names the hook sees no calls and the row says
so: update ``ROUTING_ENTRIES`` then.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from bench_common import Deadline, Settings, Shape, error_fields, skipped, synchronize
from suite_layers import DEADLINE_REASON, bounded_layer, build, random_tokens

import coda_gqa_l.attention as attention_module
from coda_gqa_l import BoundedCoDAAttention

ROUTING_ENTRIES = ("route_chunk", "route_chunk_triton")
RANGE_NAME = "coda::route_chunk"
ROUTING_KERNEL_NAMES = re.compile(r"rout|bank", re.IGNORECASE)


@contextmanager
def routing_hook(device: str, synchronized: bool) -> Iterator[dict[str, float]]:
    """Wrap the layer's routing entry point; yields ``{"calls", "seconds"}`` filled as it runs."""
    originals: dict[str, Callable[..., Any]] = {name: getattr(attention_module, name) for name in ROUTING_ENTRIES}
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

    for name, original in originals.items():
        setattr(attention_module, name, wrap(original))
    try:
        yield tally
    finally:
        for name, original in originals.items():
            setattr(attention_module, name, original)


def _prefill(layer: BoundedCoDAAttention, x: torch.Tensor, settings: Settings) -> float:
    began = time.perf_counter()
    layer.prefill_chunked(x, layer.init_state(1), settings.block_size, return_outputs=False)
    synchronize(settings.device)
    return time.perf_counter() - began


def _profiled_shares(layer: BoundedCoDAAttention, x: torch.Tensor, settings: Settings) -> dict[str, Any]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with (
        routing_hook(settings.device, synchronized=False),
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
    ):
        _prefill(layer, x, settings)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.name != RANGE_NAME]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    routing_us = sum(e.device_time_total for e in events if e.name == RANGE_NAME and e.device_type == DeviceType.CPU)
    named_us = sum(e.time_range.elapsed_us() for e in kernels if ROUTING_KERNEL_NAMES.search(e.name))
    # some torch versions attribute no device time to CPU ranges: 0 there means "unknown", not "free"
    return {
        "profiler_share": routing_us / total_us if total_us and routing_us else None,
        "named_kernel_share": named_us / total_us if total_us and named_us else None,
        "profiled_kernel_ms": total_us / 1e3,
    }


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
                row["note"] = f"no call went through attention.{ROUTING_ENTRIES}: update ROUTING_ENTRIES"
            row["sync_hook_share"] = tally["seconds"] / hooked_s if tally["calls"] else None
            if settings.cuda:
                row |= _profiled_shares(layer, x, settings)
    except Exception as exc:
        row |= error_fields(exc)
    return row
