"""Prefill under CUDA graphs: ``CapturedPrefill`` replays one captured step per chunk (docs/kernels.md).

An eager ``prefill_chunked`` on the GPU launches about 47 kernels a chunk at the 7B shape, 36 of them small (the
ring's index arithmetic, the window's gathers, index copies, RoPE tables), and the host issues them more slowly
than the GPU runs them: in a 32K prefill the GPU idled about a quarter of the time (benchmarks/results/speed.md,
"Routing a chunk ahead"). Captured, a chunk is one graph launch, its work computed from a 0-d device position
(``decode.begin_at_device_position``), as the whole model's graph read does.

Inside the graph a chunk runs as ``pieces`` equal pieces: every piece's projections, window and routing launch
first, each piece's routing on its own side stream after the routing of the piece before (it wrote the banks the
next one reads), then each piece's attention once its routing is done. The routing kernel (one program per KV head
and bank) thus runs beside the projections of later pieces and the attention of earlier ones. The banks each
segment sees are those of segment-synchronous routing (SPEC 2.3) whatever the pieces: only the order of
independent kernels changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import Tensor

from . import step_tables
from .attention import BoundedCoDAAttention
from .decode import (
    begin_at_device_position,
    capture_step,
    finish_at_device_position,
    routing_streams,
    sm_carveout,
)
from .kernels import dispatch
from .kernels.routing import routing_programs
from .state import BoundedState, byte_views, copy_tensors, zero_tensors


class CapturedPrefill:
    """Graph-captured ``prefill_chunked`` of one bounded layer on CUDA, for inference.

    Args:
        layer: the bounded layer (on CUDA: the fused Triton kernels are used).
        chunk: tokens a captured step takes, a multiple of the layer's segment length (a call's last aligned
            stretch shorter than this is captured at its own length). Larger chunks run larger products and fewer
            graph boundaries, where the routing pipeline drains: a 7B layer's 32K prefill from no state took 10.04 /
            9.19 / 8.73 ms at chunks of 4,096 / 8,192 / 16,384 (two pieces) on an H100 (results/speed.md, "Larger
            chunks"); the buffers and graphs grow with it (see there for their memory).
        pieces: pieces a chunk's routing is pipelined in (fewer where the chunk does not split into whole
            segments, and one while the chunk writes sinks that a piece after the first would hold).
        weights: the pieces' relative sizes, one positive int a piece (``pieces`` of them; None: equal). Whole
            segments each, as near those proportions as they round; fewer, equal pieces where a chunk has fewer
            segments than the weights ask. A small first piece starts the routing early, a small last one
            shortens what waits for the last routing (its attention and output projection).
        capture: False runs the same steps eagerly: on the CPU with Triton's interpreter, for tests.
        max_graphs: captured chunk lengths kept (the least recently replayed dropped beyond it; all share one
            memory pool). A change to the layer's tensors (moved, fused, weights loaded) drops them all.

    ``prefill(x, state)`` takes the arguments of ``layer.prefill_chunked`` (but ``block_size``; ``state`` None for a
    fresh one) and returns the same ``(y, state)`` up to float rounding. Tokens before the state's next segment start
    and a tail of less than a segment go through ``layer.prefill_chunked``; the segment-aligned tokens between go
    through the graphs. The state handed in is never written in place: its fields are replaced by new tensors
    (``write_cache=True``) or a new state is returned. Gradients do not flow; use ``layer.prefill_chunked`` to train.
    """

    def __init__(
        self,
        layer: BoundedCoDAAttention,
        *,
        chunk: int = 16384,
        pieces: int = 2,
        weights: tuple[int, ...] | None = None,
        capture: bool = True,
        max_graphs: int = 4,
    ) -> None:
        weight = layer.core.q_proj.weight
        if capture and weight.device.type != "cuda":
            raise ValueError(f"CapturedPrefill needs the layer on a CUDA device, it is on {weight.device}")
        segment = layer.config.segment
        for name, value in (("chunk", chunk), ("pieces", pieces), ("max_graphs", max_graphs)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if chunk % segment:
            raise ValueError(f"chunk must be a multiple of the segment length {segment}, got {chunk}")
        if weights is not None and (
            not isinstance(weights, tuple)
            or len(weights) != pieces
            or any(not isinstance(w, int) or isinstance(w, bool) or w <= 0 for w in weights)
        ):
            raise ValueError(f"weights must be a tuple of {pieces} positive ints (one a piece), got {weights!r}")
        if layer.collect_metrics:
            raise ValueError("CapturedPrefill does not collect routing metrics; use layer.prefill_chunked")
        self.layer = layer
        self._chunk, self._pieces, self._graphed, self._max_graphs = chunk, pieces, capture, max_graphs
        self._weights = weights
        device = weight.device
        with torch.inference_mode(False):  # updated in place by the graphs, whatever mode the caller is in
            self._pos = torch.zeros((), dtype=torch.int64, device=device)
            self._window_offsets = torch.arange(layer.config.window, device=device)
            self._sink_index = torch.arange(layer.config.num_sink, device=device)
        # static buffers, made for the first call's batch size and dtypes (a call with others makes new ones)
        self._arena: BoundedState | None = None
        self._arena_bytes: list[Tensor] | None = None  # its tensors as byte views (state.byte_views), for zeroing
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # least recently replayed first
        self._pool: Any = None
        self._signature = _LayerSignature(layer)
        self._captured_on: list[tuple[int, int]] = []  # the layer's tensors the graphs read: _LayerSignature

    @property
    def chunk(self) -> int:
        """Tokens a captured step takes (fixed at construction: the buffers and graphs are made for it)."""
        return self._chunk

    @property
    def pieces(self) -> int:
        """Pieces a chunk's routing is pipelined in, at most (fixed at construction)."""
        return self._pieces

    # ------------------------------------------------------------------ public
    def prefill(
        self, x: Tensor, state: BoundedState | None = None, *, return_outputs: bool = True, write_cache: bool = True
    ) -> tuple[Tensor | None, BoundedState]:
        """``x (B, L, D)`` from ``state``: ``(y (B, L, D) or None, state)`` as ``layer.prefill_chunked`` gives.

        ``state=None`` starts from a fresh state without one being made first: the graphs' buffers are zeroed in
        place of a state's copy, and the state returned is made from them after the last graph is launched, while
        the GPU runs it (``layer.init_state`` and the copy in are host work the GPU would otherwise wait for: a 7B
        layer's 2K call took 0.803 ms from None against 0.993 from ``init_state`` on an H200, results/speed.md)."""
        layer = self.layer
        layer.core.check_input(x)
        if state is not None:
            layer.check_state(state, x.shape[0])
            if state.metrics:
                raise ValueError("CapturedPrefill does not collect routing metrics; use layer.prefill_chunked")
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("CapturedPrefill is for inference (no gradients flow); use layer.prefill_chunked")
        target: BoundedState | None = state
        if state is not None and not write_cache:
            target = dataclasses.replace(state, metrics={}, decode_view=None)
        S, B, L = layer.config.segment, x.shape[0], x.shape[1]
        y = x.new_empty(B, L, layer.embed_dim) if return_outputs else None
        with torch.no_grad():
            start = 0 if target is None else target.pos
            done = min((-start) % S, L)  # the tokens before the next segment start
            if done:
                assert target is not None  # a fresh state starts at a segment start
                self._eager(x, 0, done, target, y)
            if L - done >= S:
                self._adopt(target, x)
                while L - done >= S:
                    n = min(self._chunk, (L - done) // S * S)
                    self._run(x[:, done : done + n], start + done)
                    if y is not None:
                        assert self._y is not None  # made by _adopt
                        y[:, done : done + n].copy_(self._y[:, :n])
                    done += n
                target = self._give_back(target, start + done)
            if target is None:  # fewer tokens than a segment
                target = layer.init_state(B)
            if done < L:
                self._eager(x, done, L, target, y)
        return y, target

    __call__ = prefill

    # ------------------------------------------------------------------ internals
    def _eager(self, x: Tensor, begin: int, end: int, state: BoundedState, y: Tensor | None) -> None:
        """Tokens ``begin .. end - 1`` of ``x`` through the layer's own prefill (fields replaced, none written)."""
        if y is None:
            self.layer.prefill_chunked(x[:, begin:end], state, block_size=end - begin, return_outputs=False)
        else:
            y[:, begin:end].copy_(self.layer.prefill_chunked(x[:, begin:end], state, block_size=end - begin)[0])

    def _adopt(self, state: BoundedState | None, x: Tensor) -> None:
        """The state's tensors copied into the static buffers, or the buffers zeroed for a fresh state (None); the
        buffers made anew for another batch size or dtype."""
        if self._captured_on != self._signature():
            # the graphs read the layer's parameters and the tables derived from them at fixed addresses: after the
            # layer changed (moved, fused, weights loaded) they are captured anew
            self._drop_graphs()
        if not self._fits(state, x):
            self._drop_graphs()  # captured on the old buffers
            with torch.inference_mode(False):  # buffers the graphs update in place, whatever mode the caller is in
                self._arena = self.layer.init_state(x.shape[0]) if state is None else state.clone()
                self._arena_bytes = byte_views(list(self._arena.tensors().values()))
                self._x = torch.zeros(x.shape[0], self._chunk, x.shape[2], device=x.device, dtype=x.dtype)
                self._y = torch.zeros_like(self._x)
            return
        assert self._arena is not None  # _fits checked it
        if state is None:
            if self._arena_bytes is not None:
                torch._foreach_zero_(self._arena_bytes)  # one launch, the views made once
            else:
                zero_tensors(list(self._arena.tensors().values()))
            self._arena.pos = 0
            return
        copy_tensors(list(self._arena.tensors().values()), list(state.tensors().values()))
        self._arena.pos = state.pos

    def _drop_graphs(self) -> None:
        """Every graph dropped; their pool goes with them (a pool no graph uses must not be passed to a capture)."""
        self._graphs.clear()
        self._pool = None

    def _fits(self, state: BoundedState | None, x: Tensor) -> bool:
        """Whether the static buffers have the batch size, dtypes and shapes of ``state`` (None: a fresh state of
        the layer's) and ``x``."""
        if self._arena is None or self._x is None or self._x.shape[0] != x.shape[0] or self._x.dtype != x.dtype:
            return False
        if state is None:  # the layer's config and shapes are fixed: its fresh state differs only in these
            weight = self.layer.core.q_proj.weight
            return self._arena.batch_size == x.shape[0] and self._arena.dtype == weight.dtype
        pairs = zip(self._arena.tensors().values(), state.tensors().values(), strict=True)
        return all(mine.shape == theirs.shape and mine.dtype == theirs.dtype for mine, theirs in pairs)

    def _give_back(self, state: BoundedState | None, pos: int) -> BoundedState:
        """The static buffers' values as new tensors of ``state``, or of a new state for a fresh start (None); the
        buffers stay the graphs'."""
        assert self._arena is not None
        buffers = self._arena.tensors()
        copies: dict[str, Any] = {name: torch.empty_like(t) for name, t in buffers.items()}
        copy_tensors(list(copies.values()), list(buffers.values()))
        if state is None:
            return dataclasses.replace(self._arena, **copies, pos=pos, metrics={}, decode_view=None)
        for name, copy in copies.items():
            setattr(state, name, copy)
        state.pos = pos
        state.decode_view = None
        return state

    def _run(self, x: Tensor, pos: int) -> None:
        """One aligned chunk ``x (B, n, D)`` at ``pos`` through its graph (captured on first use): outputs into
        ``self._y[:, :n]``, the state's buffers advanced."""
        assert self._x is not None and self._arena is not None
        n = x.shape[1]
        sinks = pos < self.layer.config.num_sink
        self._x[:, :n].copy_(x)
        self._pos.fill_(pos)
        self._arena.pos = pos
        if not self._graphed:
            with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
                self._step(n, sinks)
            return
        key = (n, sinks)
        graph = self._graphs.pop(key, None)
        if graph is None:
            graph = self._capture(key)
        self._graphs[key] = graph  # the most recently replayed last: the first in line to be dropped is the oldest
        graph.replay()

    def _capture(self, key: tuple[int, bool]) -> torch.cuda.CUDAGraph:
        """Warm up (compile, autotune) on a scratch copy of the buffers, then capture on them."""
        live = self._arena
        assert live is not None and self._x is not None
        saved_pos = self._pos.clone()

        def warm_up() -> None:
            self._arena = live.clone()
            try:
                for _ in range(2):
                    self._step(*key)
                    self._pos.copy_(saved_pos)
            finally:
                self._arena = live

        carveout = None
        if dispatch.products_leave_routing_sms() and self.pieces_for(*key) > 1:
            # the products run beside the routing's programs, which hold their multiprocessors for the whole chain
            carveout = routing_programs(self._x.shape[0], self.layer.core.num_kv_heads)
        with sm_carveout(carveout):
            graph = capture_step(lambda: self._step(*key), warm_up, self._x.device, self._pool)
        self._pool = graph.pool()
        self._captured_on = self._signature()
        # dropped only after the capture, which keeps the shared pool in use throughout
        while len(self._graphs) >= self._max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        return graph

    def pieces_for(self, n: int, sinks: bool) -> int:
        """Pieces an ``n``-token chunk runs in (``piece_sizes``)."""
        return len(self.piece_sizes(n, sinks))

    def piece_sizes(self, n: int, sinks: bool) -> list[int]:
        """Tokens of each piece an ``n``-token chunk (whole segments) runs in: at most ``pieces``, each a whole
        number of segments, sized by ``weights`` (else equal), and one piece when sinks are written beyond the
        first piece (a later piece's sinks must not reach an earlier piece's attention, which runs after every
        piece's window and sinks are written)."""
        S, Ns = self.layer.config.segment, self.layer.config.num_sink
        segments = n // S
        if self._weights is not None and segments >= len(self._weights):
            sizes = [S * s for s in _apportion(segments, self._weights)]
        else:
            count = max(k for k in range(1, self._pieces + 1) if n % (k * S) == 0)
            sizes = [n // count] * count
        if sinks and sizes[0] < Ns:
            return [n]
        return sizes

    def _step(self, n: int, sinks: bool) -> None:
        """``self._x[:, :n]`` from the device position ``self._pos`` into ``self._y[:, :n]``, the buffers advanced."""
        layer, state = self.layer, self._arena
        assert state is not None and self._x is not None and self._y is not None
        sizes = self.piece_sizes(n, sinks)
        count = len(sizes)
        starts = [sum(sizes[:p]) for p in range(count)]
        x = self._x[:, :n]
        streams = routing_streams(x.device, count) if count > 1 and x.device.type == "cuda" else [None] * count
        positions = [self._pos + start for start in starts]  # kept alive: step tables key on their ids
        with step_tables.step_tables():
            begun = []
            routed = None
            for p in range(count):
                piece = begin_at_device_position(
                    layer, state, x[:, starts[p] : starts[p] + sizes[p]], positions[p], self._window_offsets,
                    self._sink_index, True, sinks=sinks, routing_stream=streams[p], after=routed,
                )  # fmt: skip
                routed = piece.routed
                begun.append(piece)
            for p, piece in enumerate(begun):
                into = self._y[:, starts[p] : starts[p] + sizes[p]]
                if into.is_contiguous():  # batch 1: the output projection writes the buffer itself
                    finish_at_device_position(layer, state, piece, positions[p], into=into)
                else:
                    into.copy_(finish_at_device_position(layer, state, piece, positions[p]))


def _apportion(total: int, weights: tuple[int, ...]) -> list[int]:
    """``total`` split in proportion to ``weights``, each part at least 1 (``total >= len(weights)``): largest
    remainders first, ties to the earlier part."""
    parts = [max(1, total * w // sum(weights)) for w in weights]
    while sum(parts) > total:  # the floor of 1 overshot: take from the largest part
        parts[parts.index(max(parts))] -= 1
    shares = [total * w / sum(weights) - part for w, part in zip(weights, parts, strict=True)]
    for i in sorted(range(len(parts)), key=lambda i: -shares[i])[: total - sum(parts)]:
        parts[i] += 1
    return parts


class _LayerSignature:
    """Where each of a layer's tensors lives and its version (bumped by every in-place write), for the graphs: a change
    to either means they read stale addresses or tables derived from old values (the noise rotation's).

    Walking the module tree for its tensors costs about 15 us of the host's time, which a short prefill spends with
    the GPU idle (benchmarks/prefill_host_time.py), so the tensors are listed once and listed again only after some
    module anywhere registered a parameter, buffer or submodule (torch's global registration hooks count them):
    a tensor replaced under its name is seen that way, storage swapped under it (``.to()``, ``.data =``) by its
    address, an in-place write (``load_state_dict``) by its version."""

    def __init__(self, layer: BoundedCoDAAttention) -> None:
        self._layer = layer
        self._tensors: list[Tensor] = []
        self._listed_at = -1

    def __call__(self) -> list[tuple[int, int]]:
        if self._listed_at != _registrations[0]:
            self._tensors = [*self._layer.parameters(), *self._layer.buffers()]
            self._listed_at = _registrations[0]
        # an inference tensor keeps no version: its storage alone
        return [(t.data_ptr(), -1 if t.is_inference() else t._version) for t in self._tensors]


_registrations = [0]  # parameters, buffers and submodules registered on any module since import


def _count_registration(*_: Any) -> None:
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
