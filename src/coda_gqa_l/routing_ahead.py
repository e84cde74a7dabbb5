"""A GPU prefill's routing launched a chunk ahead, on a side stream (``BoundedCoDAAttention.prefill_chunked``).

The routing kernel walks a chunk's segments in order, one program per KV head and bank: a few multiprocessors
stay busy for the whole chain and the rest idle. Chunk ``c + 1``'s routing needs only the banks chunk ``c``'s
routing left and its own projections; chunk ``c``'s attention needs only chunk ``c``'s snapshots. So the prefill
projects chunk ``c + 1`` and launches its routing on a side stream before it attends chunk ``c``, and the chain runs
beside the attention and the next projections. The results are the same tensors, computed by the same kernels on
the same inputs; only the order of launches across the two streams changes.

Off by default (``dispatch.routing_ahead``): on an H100 the 7B layer's prefill gained nothing beyond the noise,
because a chunk's many small kernels arrive at the host's pace and the attention is not yet queued when the routing
starts (benchmarks/results/speed.md, "Routing a chunk ahead").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import BoundedConfig, chunk_segments
from .kernels.routing import route_chunk_triton, routing_snapshots
from .state import Banks

# PyTorch's streams take priority -1 (high) or 0 (the default); benchmarks/prefill_timeline.py times both
PRIORITY = -1
_STREAMS: dict[tuple[int, int], Any] = {}
_STREAMS_LOCK = threading.Lock()


def side_stream(device: torch.device) -> Any:
    """The process's routing-ahead stream for ``device``: one per device, at high priority, so the chain's few
    programs are placed as soon as any multiprocessor frees rather than after the attention's queued blocks. Only
    Triton kernels and fills run on it, so it pins no cuBLAS workspace."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STREAMS_LOCK:
        key = (index, PRIORITY)
        if key not in _STREAMS:
            _STREAMS[key] = torch.cuda.Stream(torch.device("cuda", index), priority=PRIORITY)
        return _STREAMS[key]


@dataclass
class RoutedAhead:
    """One chunk's routing in flight: the snapshots its segments' queries see (allocated on the caller's stream,
    which reads them once it has waited for ``done``), and what the side stream reads that nothing else holds."""

    bank_k: Tensor
    bank_v: Tensor
    bank_bias: Tensor
    done: Any  # torch.cuda.Event
    # freed early, a caller-stream tensor's block could go to the caller's next allocation while the side stream
    # still reads it; dropped with the chunk, after the caller's stream waited for ``done``
    keep: tuple[Tensor, ...]

    def wait(self) -> None:
        """Make the caller's stream wait for this routing."""
        torch.cuda.current_stream().wait_event(self.done)


class RoutingAhead:
    """One prefill's side-stream routing. The banks are a copy of the state's, taken once on the caller's stream
    and routed in place chunk after chunk (the kernel reads each bank before it writes it), so the state's tensors
    as the caller handed them are never written."""

    def __init__(self, banks: Banks) -> None:
        self.stream = side_stream(banks.ex_k.device)
        self.banks = Banks(*(t.clone(memory_format=torch.contiguous_format) for t in banks))

    def route(
        self, ext_k: Tensor, ext_v: Tensor, ext_g: Tensor, *, start: int, n: int, eta: Tensor, config: BoundedConfig
    ) -> RoutedAhead:
        """Launch the routing of tokens ``start .. start + n - 1`` on the side stream, after everything the caller's
        stream has queued (the chunk's projections) and the previous chunk's routing (same stream)."""
        snapshots = routing_snapshots(self.banks, len(chunk_segments(start, n, config.segment)))
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            route_chunk_triton(
                self.banks, ext_k, ext_v, ext_g, start=start, n=n, eta=eta, config=config, out=self.banks,
                snapshots=snapshots,
            )  # fmt: skip
            done = torch.cuda.Event()
            done.record(self.stream)
        return RoutedAhead(*snapshots, done=done, keep=(ext_k, ext_v, ext_g, eta))
