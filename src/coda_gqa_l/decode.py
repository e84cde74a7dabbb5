"""Decode under CUDA graphs: ``CapturedDecoder`` replays one captured step per token (docs/kernels.md).

A bounded layer's step has static shapes (the state never grows), so it can be captured once
and replayed at every later position. Everything that depends on the position is computed on
the device from a 0-d position tensor: the ring slots, the RoPE angles, the sink write, the
routing's token indices and the kernels' query offset. The host keeps only ``state.pos``, which
picks one of three captured graphs: the step whose token starts a segment and routes the ``S`` tokens
leaving the window into the banks (docs/semantics.md section 3), a step that computes the segment's
extras and window and keeps them, and the plain step that reads them (``KeptExtras``). No host
synchronisation, no Python loop over heads or slots.

The decoder owns the state's tensors as its static buffers: advance the state only through it
while it is in use (``decoder.state`` is the live state; clone it to keep a copy).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import step_tables
from .attention import BoundedCoDAAttention, SegmentExtras
from .kernels import dispatch
from .kernels.rope import rotate_keys
from .kernels.routing import route_chunk_triton, routing_snapshots
from .kernels.routing_reference import bank_view
from .kernels.step_inputs import step_inputs
from .kernels.window_chunk import extend_window
from .kernels.window_step import WindowStep, WindowTargets, write_window_step
from .primitives import apply_rope
from .state import BANK_FIELDS, Banks, BoundedState

# One capture at a time in a process; other threads may go on running their kernels and graphs meanwhile
# (thread-local capture mode), as a server answering several questions does.
CAPTURE_LOCK = threading.Lock()
_CAPTURE_STREAMS: dict[int, Any] = {}
_ROUTING_STREAMS: dict[int, list[Any]] = {}
_STREAMS_LOCK = threading.Lock()


def capture_stream(device: torch.device) -> Any:
    """The one side stream a process captures its graphs on, per CUDA device.

    PyTorch gives each (cuBLAS handle, stream) pair its own workspace (32 MiB on Hopper) and keeps it for the
    process's life: a stream per decoder (a database's pool holds several) would pin one workspace each. Captures
    are serialised by ``CAPTURE_LOCK`` and replays run on the caller's stream, so one stream serves them all.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STREAMS_LOCK:
        if index not in _CAPTURE_STREAMS:
            _CAPTURE_STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
        return _CAPTURE_STREAMS[index]


def routing_streams(device: torch.device, count: int) -> list[Any]:
    """``count`` side streams of ``device`` for the routing of a pipelined read (``models.graph_decode``), the same
    ones every time: only Triton kernels run on them, so they pin no cuBLAS workspace."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STREAMS_LOCK:
        streams = _ROUTING_STREAMS.setdefault(index, [])
        while len(streams) < count:
            streams.append(torch.cuda.Stream(torch.device("cuda", index)))
        return streams[:count]


def capture_step(
    step: Callable[[], None], warm_up: Callable[[], None], device: torch.device, pool: Any
) -> torch.cuda.CUDAGraph:
    """``warm_up()`` (compilation, autotuning: work that must not happen inside a capture) on the device's capture
    stream (``capture_stream``), then ``step()`` captured on it into a graph sharing memory ``pool`` (None: a new
    one).

    On ``device`` whatever device is current (a model on ``cuda:1``), with autocast off (a graph captured under it
    would replay casts cached outside its pool), one capture at a time. Our own stream context around the capture:
    if ending a failed capture raises, leaving it still puts the thread back on the stream it was on
    (``torch.cuda.graph`` restores it only after a clean end). The caller's warm-up must not change its live state.
    """
    stream = capture_stream(device)
    with CAPTURE_LOCK, torch.cuda.device(device), torch.autocast("cuda", enabled=False), torch.no_grad():
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with (
            torch.cuda.stream(stream),
            torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"),
        ):
            step()
    return graph


@contextlib.contextmanager
def sm_carveout(count: int | None) -> Iterator[None]:
    """cuBLAS products launched inside are planned for the device's multiprocessors but ``count`` (torch's SM
    carveout; None: as they are): for products captured to run beside ``count`` programs that hold their
    multiprocessors throughout (torch's note on the setting: planned for every multiprocessor, such products run a
    second wave of programs). Process-wide while inside (torch keeps one setting), so only for captures, which
    ``CAPTURE_LOCK`` serialises."""
    if count is None:
        yield
        return
    if not hasattr(torch._C, "_set_sm_carveout_experimental"):
        raise RuntimeError(
            f"the SM carveout (CODA_GQA_L_PRODUCT_CARVEOUT) needs torch 2.7 or newer, not {torch.__version__}"
        )
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(count)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)


def step_kind(pos: int, segment: int, num_sink: int, extras_valid: bool) -> str:
    """Which graph a graph decoder's one-token step at ``pos`` replays: ``"route"`` when the token starts a segment
    (it routes, and computes and keeps the segment's extras), ``"refresh"`` when the kept extras are not the live
    segment's (a fresh decoder, a capture's warm-up wrote them from a scratch copy) or the token is a sink, else
    ``"step"``, which reads them."""
    if pos % segment == 0:
        return "route"
    if not extras_valid or pos < num_sink:
        return "refresh"
    return "step"


class CapturedDecoder:
    """Graph-captured ``step`` of one bounded layer on CUDA.

    Args:
        layer: the bounded layer (on CUDA; Triton kernels are used).
        state: the state to continue; its tensors become the decoder's static buffers.
        capture: False runs the same steps eagerly (no graphs): on the CPU with Triton's interpreter, for tests.

    ``decoder(x_t)`` takes ``(B, 1, D)`` (or ``(B, D)``) and returns ``(B, 1, D)``; it equals
    ``layer.step`` up to float rounding. Three kinds of step, each captured on first use, as the whole model's
    decoder has them (``models.graph_decode``): the step whose token starts a segment and routes; a step that
    computes the segment's extras (sinks and bank slots rotated, their logit offsets, the segment's window) and keeps
    them in static buffers; and the plain step, which reads them, since they do not change before the next routing.
    """

    def __init__(self, layer: BoundedCoDAAttention, state: BoundedState, *, capture: bool = True) -> None:
        weight = layer.core.q_proj.weight
        if capture and weight.device.type != "cuda":
            raise ValueError(f"CapturedDecoder needs the layer on a CUDA device, it is on {weight.device}")
        layer.check_state(state, state.batch_size)
        if state.metrics:
            raise ValueError("CapturedDecoder does not collect routing metrics; use layer.step")
        with torch.inference_mode(False):
            for name, tensor in state.tensors().items():
                if tensor.is_inference():
                    # a state prefilled under torch.inference_mode cannot be updated in place
                    # outside it: the decoder's buffers are normal copies
                    setattr(state, name, tensor.clone())
        self.layer = layer
        self.state = state
        self.capture = capture
        device, dtype = weight.device, weight.dtype
        self._pos = torch.tensor(state.pos, dtype=torch.int64, device=device)
        self._x = torch.zeros(state.batch_size, 1, layer.embed_dim, device=device, dtype=dtype)
        self._y = torch.zeros_like(self._x)
        self._window_offsets = torch.arange(layer.config.window, device=device)
        self._sink_index = torch.arange(layer.config.num_sink, device=device)
        self._kept = KeptExtras()  # the segment's extras and window: static buffers of the three graphs
        self._extras_valid = False  # whether _kept holds the live state's current segment
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None  # the graphs share one memory pool

    # ------------------------------------------------------------------ public
    def __call__(self, x_t: Tensor) -> Tensor:
        if x_t.dim() == 2:
            x_t = x_t[:, None]
        if x_t.shape != self._x.shape or x_t.dtype != self._x.dtype or x_t.device != self._x.device:
            raise ValueError(
                f"x_t must be {tuple(self._x.shape)} {self._x.dtype} on {self._x.device}, got "
                f"{tuple(x_t.shape)} {x_t.dtype} on {x_t.device}"
            )
        config = self.layer.config
        kind = step_kind(self.state.pos, config.segment, config.num_sink, self._extras_valid)
        self._x.copy_(x_t)
        if self.capture:
            graph = self._graphs.get(kind)
            if graph is None:
                graph = self._capture(kind)
            graph.replay()
        else:
            with torch.no_grad():
                self._step(kind)
        self._extras_valid = True  # every kind leaves the live segment's extras kept
        self.state.pos += 1
        return self._y.clone()

    # ------------------------------------------------------------------ capture
    def _capture(self, kind: str) -> torch.cuda.CUDAGraph:
        """Warm up (compile, autotune) on a scratch copy of the state, then capture in place."""
        live = self.state

        def warm_up() -> None:
            self.state = live.clone()
            saved_pos = self._pos.clone()
            try:
                for _ in range(2):
                    self._step(kind)
                    self._pos.copy_(saved_pos)
            finally:
                self.state = live

        device = self._x.device
        graph = capture_step(lambda: self._step(kind), warm_up, device, self._pool)
        self._pool = graph.pool()
        self._graphs[kind] = graph
        return graph

    def _step(self, kind: str) -> None:
        """One token at the device position ``self._pos``, written into the static buffers."""
        with step_tables.step_tables():  # the step's RoPE tables and ring slots, computed once
            y = advance_at_device_position(
                self.layer,
                self.state,
                self._x,
                self._pos,
                self._window_offsets,
                self._sink_index,
                kind == "route",
                self._kept,
                reuse=kind == "step",
            )
        self._pos.add_(1)
        self._y.copy_(y)


@dataclass
class KeptExtras:
    """One layer's segment extras (sinks and bank slots rotated, their logit offsets, the noise rotation's tables:
    ``BoundedCoDAAttention.segment_extras``) kept across the one-token steps of a segment, which do not change
    them: a graph decoder's static buffers, written by the steps that compute them and read by the others.

    Beside them the segment's window in token order, ``window_k``/``window_v`` ``(B, Hkv, W, Dh)``: slot ``i`` holds
    token ``b - W + S + i`` of the segment starting at ``b`` (keys rotated at their positions in relative mode), the
    keys and values the segment's queries see. The step that computes the extras fills it from the ring; each later
    step adds its own token (``kernels.window_step``), so those steps gather and rotate no window."""

    value: SegmentExtras | None = None
    window_k: Tensor | None = None
    window_v: Tensor | None = None


def advance_at_device_position(
    layer: BoundedCoDAAttention,
    st: BoundedState,
    x: Tensor,
    pos: Tensor,
    window_offsets: Tensor,
    sink_index: Tensor,
    routes: bool,
    kept: KeptExtras | None = None,
    reuse: bool = False,
    sinks: bool = True,
    projected: Tensor | None = None,
) -> Tensor:
    """``n`` tokens ``x (B, n, D)`` from the 0-d device position ``pos``: returns ``(B, n, D)`` and writes the
    state's tensors in place (their identity is kept, so they can be a graph's static buffers).

    One token (``n == 1``): ``routes`` says whether it starts a segment, so that the ``S`` tokens leaving the
    window are routed into the banks. A chunk (``n > 1``, the graph-captured prefill): ``pos`` must be a multiple of
    the segment length ``S`` and ``n`` a multiple of ``S`` (``routes`` then True): the chunk routes at each of its
    ``n / S`` segment starts, as ``layer.forward`` does. Nothing here reads the position on the host, so one capture
    serves every position that keeps those alignments. ``pos`` and ``st.pos`` are not advanced (a model advances
    them once for all its layers). ``window_offsets`` is ``arange(window)`` and ``sink_index`` ``arange(num_sink)``
    on the device.

    ``kept`` (one token only): the step writes its segment extras and the segment's window there, or with ``reuse``
    reads them from there instead of computing them, adds its token to the kept window, and writes no sink: right
    only inside the segment they were computed in, after the sinks are written (the caller's bookkeeping:
    ``models.graph_decode``).
    ``sinks=False``: the tokens are past the sinks (``pos >= num_sink``, the caller knows it on the host), so no sink
    is written (a captured chunk read after the first chunk).
    ``projected`` (a plain step with ``reuse`` whose layer takes ``one_pass_step_inputs``): the layer's fused input
    product of ``x``, already computed (``kernels.step_products.norm_product`` forms it from the residual stream in
    one kernel); ``x`` then gives only the shapes.
    """
    S = layer.config.segment
    n = x.shape[1]
    if n > 1 and (n % S or not routes or kept is not None):
        raise ValueError(f"a chunk at a device position must be a multiple of the segment ({S}) and route, got {n}")
    if reuse and (routes or kept is None or kept.value is None or kept.window_k is None):
        raise ValueError("reusing segment extras needs a plain step and extras kept by an earlier one")
    at = ("device", id(pos))  # the step's tables (ring slots, sink flags) are shared by its layers: step_tables.py
    if projected is not None and not (reuse and one_pass_step_inputs(layer)):
        raise ValueError("a projected input serves only a plain step that takes its inputs in one pass")
    if reuse:
        assert kept is not None  # checked above
        return _plain_step(layer, st, x, pos, kept, at, projected)
    chunk = begin_at_device_position(layer, st, x, pos, window_offsets, sink_index, routes, sinks=sinks)
    return finish_at_device_position(layer, st, chunk, pos, kept)


@dataclass
class ChunkInFlight:
    """What a chunk's attention needs between the launch of its routing and the attention (a pipelined read):
    its queries and lambda, the window extended by its tokens, the banks as each of its segments sees them, and the
    event its routing records on a side stream (``None``: routed on the caller's stream, or not routed)."""

    q: Tensor
    lam: Tensor | None
    ext_k: Tensor
    ext_v: Tensor
    bank_k: Tensor
    bank_v: Tensor
    bank_bias: Tensor
    tokens: int
    window_offsets: Tensor
    routed: Any = None
    # the caller-stream tensors the side stream's routing reads that nothing else here holds (the gates ``ext_g``
    # above all): freed early, the caching allocator hands their blocks to the caller's stream's next allocation (in
    # a capture, from the private pool, with no graph edge to the routing kernel) while the kernel still reads them.
    # Dropped with the chunk, after ``finish_at_device_position`` made the caller's stream wait for the routing.
    keep: tuple[Tensor, ...] = ()


def begin_at_device_position(
    layer: BoundedCoDAAttention,
    st: BoundedState,
    x: Tensor,
    pos: Tensor,
    window_offsets: Tensor,
    sink_index: Tensor,
    routes: bool,
    *,
    sinks: bool = True,
    routing_stream: Any = None,
    after: Any = None,
) -> ChunkInFlight:
    """The first half of ``advance_at_device_position`` (not ``reuse``): projections, the window extended and the
    ring written, the sinks, and the routing launched. With ``routing_stream`` (CUDA) the routing kernel runs there,
    after the caller's stream has produced its inputs and after the event ``after`` (this layer's routing of the
    previous chunk, which wrote the banks it reads); its snapshots are allocated on the caller's stream, which
    ``finish_at_device_position`` makes wait for the kernel. The routing is Triton only, so a side stream adds no
    cuBLAS workspace."""
    cfg, core = layer.config, layer.core
    S, Ns = cfg.segment, cfg.num_sink
    n = x.shape[1]
    at = ("device", id(pos))
    q: Tensor | None = None
    lam: Tensor | None = None
    if n > 1 and layer.input_projection is None:
        # keys, values and gates first: the routing (on a side stream) starts while the queries' products run
        k, v, g = layer.project_keys(x)  # g: (B, Hkv, n)
    else:  # fused, one product
        q, k, v, lam, g = layer.project_inputs(x)
    relative = cfg.position_mode == "relative"
    if not relative:
        cos, sin = core.rope.cos_sin(pos + torch.arange(n, device=pos.device), torch.float32)
        k = apply_rope(k.float(), cos, sin, core.rope.layout).to(k.dtype)
    # the window before pos in token order, then the tokens; the ring then takes the tokens (one pass: nothing
    # below reads the ring, until _fill_segment_window, which wants the new token in it)
    ext_k, ext_v, ext_g = extend_window(st.win_k, st.win_v, st.win_g, pos, k, v, g, window_offsets)
    if Ns and sinks:
        # tokens among the first Ns are also sinks (a no-op write at later positions)
        if n == 1:  # the decode step: fewer kernels than the chunk's gather
            is_new = step_tables.table(("sink", at, Ns), lambda: (sink_index == pos).view(1, 1, Ns, 1))
            k_new, v_new = k, v
        else:
            offset = sink_index - pos  # each sink's index in this chunk
            is_new = ((offset >= 0) & (offset < n)).view(1, 1, Ns, 1)
            pick = offset.clamp(0, n - 1)
            k_new, v_new = k.index_select(2, pick), v.index_select(2, pick)
        st.sink_k.copy_(torch.where(is_new, k_new.to(st.sink_k.dtype), st.sink_k))
        st.sink_v.copy_(torch.where(is_new, v_new.to(st.sink_v.dtype), st.sink_v))
    banks = Banks(*(getattr(st, name) for name in BANK_FIELDS))
    routed = None
    keep: tuple[Tensor, ...] = ()
    if not routes:
        bank_k, bank_v, bank_bias = (part.unsqueeze(2) for part in bank_view(banks))
    elif routing_stream is None:
        # the capture-time start fixes only the number of segments (n / S, routing at each start); the state's
        # banks routed in place: no copies after the kernel
        _, bank_k, bank_v, bank_bias = route_chunk_triton(
            banks, ext_k, ext_v, ext_g, start=S, n=n, eta=layer.eta, config=cfg, start_dev=pos, out=banks
        )
    else:
        snapshots = routing_snapshots(banks, n // S)
        eta = layer.eta  # a new tensor each call (a sigmoid), computed here on the caller's stream and kept
        keep = (ext_g, eta, pos, *snapshots)
        routing_stream.wait_stream(torch.cuda.current_stream())
        if after is not None:
            routing_stream.wait_event(after)
        with torch.cuda.stream(routing_stream):
            route_chunk_triton(
                banks, ext_k, ext_v, ext_g, start=S, n=n, eta=eta, config=cfg, start_dev=pos, out=banks,
                snapshots=snapshots,
            )  # fmt: skip
            routed = torch.cuda.Event()
            routed.record(routing_stream)
        bank_k, bank_v, bank_bias = snapshots
    if q is None:
        q, lam = layer.project_queries(x)
    return ChunkInFlight(q, lam, ext_k, ext_v, bank_k, bank_v, bank_bias, n, window_offsets, routed, keep)


def finish_at_device_position(
    layer: BoundedCoDAAttention,
    st: BoundedState,
    chunk: ChunkInFlight,
    pos: Tensor,
    kept: KeptExtras | None = None,
    into: Tensor | None = None,
) -> Tensor:
    """The second half of ``advance_at_device_position``: the segment extras from the banks the routing left, and
    the attention; waits for a routing launched on a side stream first. ``into``: where to write the outputs
    (``BoundedCoDAAttention.project_out``)."""
    if chunk.routed is not None:
        torch.cuda.current_stream().wait_event(chunk.routed)
    extras = layer.segment_extras(
        st.sink_k, st.sink_v, chunk.bank_k, chunk.bank_v, chunk.bank_bias, pos, chunk.q.dtype,
        one_pass=not torch.is_grad_enabled(),
    )  # fmt: skip
    if kept is not None:
        if kept.value is None:  # the first step allocates the buffers (a warm-up, before any capture)
            kept.value = extras.clone()
        else:
            kept.value.copy_(extras)
    y = layer.attend_fused(
        chunk.q, chunk.lam, chunk.ext_k, chunk.ext_v, st.sink_k, st.sink_v, None, None, None, pos, extras=extras,
        into=into,
    )  # fmt: skip
    st.position.add_(chunk.tokens)
    if kept is not None:
        _fill_segment_window(layer, st, kept, pos, chunk.window_offsets, chunk.q.dtype)
    return y


def _plain_step(
    layer: BoundedCoDAAttention,
    st: BoundedState,
    x: Tensor,
    pos: Tensor,
    kept: KeptExtras,
    at: tuple[str, int],
    projected: Tensor | None = None,
) -> Tensor:
    """One token inside its segment, from the segment's kept extras and window buffer: the token into the ring and
    the buffer, then attention over the buffer. From a folded layer's product in one pass (``kernels.step_inputs``)
    where ``one_pass_step_inputs`` allows, else projections, window step and the queries' rotation apart."""
    core, S = layer.core, layer.config.segment
    assert kept.value is not None and kept.window_k is not None and kept.window_v is not None  # checked by the caller
    targets = WindowTargets(st.win_k, st.win_v, st.win_g, st.position, kept.window_k, kept.window_v)
    # the step's table: the queries', and the key the buffer holds (attend_fused reads the same one)
    cos, sin = step_tables.cos_sin_range(core.rope, ("queries", at, 1), pos, 1)
    if one_pass_step_inputs(layer):
        assert layer.input_projection is not None  # one_pass_step_inputs checked it
        noise_cos, noise_sin = core.noise_tables() or (None, None)
        row = layer.input_projection(x) if projected is None else projected
        stacked, step_lam = step_inputs(
            row, core.num_heads, core.num_kv_heads, cos, sin, noise_cos, noise_sin, targets, pos, S, core.rope.layout,
        )  # fmt: skip
        return layer.attend_stacked(
            stacked, step_lam, kept.window_k, kept.window_v, pos, kept.value, segment_window=True
        )
    q, k, v, lam, g = layer.project_inputs(x)
    if layer.config.position_mode == "relative":
        token_step = WindowStep(k, v, g, cos, sin)
    else:  # absolute positions: the key is kept rotated, and goes into the buffer as it is
        token_step = WindowStep(apply_rope(k.float(), cos, sin, core.rope.layout).to(k.dtype), v, g, None, None)
    write_window_step(token_step, targets, pos, S, core.rope.layout)
    return layer.attend_fused(
        q, lam, kept.window_k, kept.window_v, st.sink_k, st.sink_v, None, None, None, pos,
        extras=kept.value, segment_window=True,
    )  # fmt: skip


def one_pass_step_inputs(layer: BoundedCoDAAttention) -> bool:
    """Whether a plain step of ``layer`` can take its attention inputs from the fused product in one pass
    (``kernels.step_inputs``): one input product laid out q, k, v, lambda's logits, the gate's logits; relative
    positions; no query or key norm and no lambda scale (the kernel applies neither); not inside
    ``dispatch.separate_step_inputs()``."""
    core = layer.core
    return (
        dispatch.one_pass_step_inputs_allowed()
        and layer.input_projection is not None
        and core.lambda_proj is not None
        and core.lambda_scale is None
        and core.q_norm is None
        and core.k_norm is None
        and layer.config.position_mode == "relative"
    )


def _fill_segment_window(
    layer: BoundedCoDAAttention, st: BoundedState, kept: KeptExtras, pos: Tensor, window_offsets: Tensor,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    """``kept.window_k``/``window_v`` <- the window of the segment holding ``pos``, from the ring (which already holds
    the token at ``pos``): slot ``i`` is token ``b - W + S + i``, keys rotated as ``attend_fused`` rotates them.
    Slots of the segment's later tokens get whatever the ring holds (the kernel masks them until a step writes
    them)."""
    cfg, rope = layer.config, layer.core.rope
    W, S = cfg.window, cfg.segment
    at = ("device", id(pos))
    tokens = step_tables.table(("segment window", at, S, W), lambda: pos - pos % S - W + S + window_offsets)
    slots = step_tables.table(("segment window slots", at, S, W), lambda: tokens % W)
    keys = st.win_k.index_select(2, slots).to(dtype)
    if cfg.position_mode == "relative":
        cos, sin = step_tables.cos_sin(rope, ("segment window", at, S, W), lambda: tokens)
        keys = rotate_keys(keys, cos, sin, rope.layout)
    if kept.window_k is None or kept.window_v is None:  # allocated by the first step (a warm-up, before any capture)
        kept.window_k, kept.window_v = torch.empty_like(keys), torch.empty_like(keys)
    kept.window_k.copy_(keys)
    kept.window_v.copy_(st.win_v.index_select(2, slots))
