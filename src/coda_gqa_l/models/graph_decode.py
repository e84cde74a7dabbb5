"""The whole model's decode step under CUDA graphs: ``GraphModelDecoder`` (docs/kernels.md).

``decode.CapturedDecoder`` captures one bounded layer; this captures a converted model's full
step, token id in, logits out: embedding, every decoder block (norms, our bounded attention step,
the MLP), the final norm and the LM head. Three decode graphs: the step whose token starts a segment
and routes into the banks (every layer routes at the same positions); a step that computes the
segment's extras (its sinks and bank slots rotated, their logit offsets) and keeps them in static
buffers; and the plain step inside a segment, which reads them (they do not change before the next
routing), so that most steps skip that work. ``read`` replays a fourth kind, a whole prompt or
document chunk (``graph_prefill``). Between tokens the host only copies the token id in, picks the
graph and replays it: no Python loop over layers, no host synchronisation inside the step.

The graphs read and write static buffers: each layer's state tensors. ``adopt(cache)`` copies a
cache's states into them and rebinds the cache's states to them, so the cache stays the live state
while the decoder advances it. Prefilling through the model (a prompt, a follow-up question)
rebinds the states' tensors again: call ``adopt`` before decoding after it. One decoder per cache:
two caches (two concurrent questions) need two decoders.

Dense Llama-family blocks only (Llama, Mistral, Qwen2, Qwen3): their block is pre-norm attention
then pre-norm MLP, each added to the residual. Mixture-of-experts MLPs pick experts on the host.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..attention import BoundedCoDAAttention
from ..decode import (
    KeptExtras,
    advance_at_device_position,
    begin_at_device_position,
    capture_step,
    finish_at_device_position,
    one_pass_step_inputs,
    routing_streams,
    step_kind,
)
from ..kernels import dispatch
from ..kernels.residual_norm import add_rms_norm, fusable, rms_norm_eps
from ..kernels.step_products import activated_product, norm_product
from ..state import BoundedState, copy_tensors
from ..step_tables import step_tables
from .adapters import CoDAAttentionAdapter
from .cache import BoundedCache
from .inference import silu_gated_mlp

GRAPH_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class GraphDecodeError(ValueError):
    """The model or cache cannot be decoded by ``GraphModelDecoder`` (the message says why)."""


class GraphCaptureError(RuntimeError):
    """Warming up or capturing a graph failed. The live state is unchanged (the warm-up runs on copies and a
    capture records without running), so the caller can go on with the model's forward."""


class GraphModelDecoder:
    """Graph-captured decode of a bounded model, one token per call.

    Args:
        model: a Llama-family causal LM converted with ``convert(model, config)`` (every layer bounded).
        cache: a ``BoundedCache`` with every layer's state (prefilled, or empty states a first ``read`` fills);
            its states become the decoder's buffers (``adopt``). A decode step needs at least one token read.
        capture: ``True`` (the default) captures CUDA graphs and needs the model on CUDA; ``False`` runs
            the same step eagerly (on the CPU with Triton's interpreter: how the tests check the step).

    ``decoder(token_ids)`` takes ``(B, 1)`` or ``(B,)`` token ids and returns the next-token logits
    ``(B, vocab)`` in float32, as ``model(token_ids, cache=cache).logits[:, -1]`` would.
    """

    def __init__(self, model: nn.Module, cache: BoundedCache, *, capture: bool = True) -> None:
        family: Any = model  # a Hugging Face causal LM: .model (embedding, blocks, norm) and .lm_head
        inner: Any = family.model
        self.blocks: list[Any] = list(inner.layers)
        self.attention = bounded_layers(model)
        self.embed: Any = inner.embed_tokens
        self.norm: Any = inner.norm
        self.lm_head: Any = family.lm_head
        weight: Tensor = self.lm_head.weight
        self.device = weight.device
        if capture and self.device.type != "cuda":
            raise GraphDecodeError(f"capturing CUDA graphs needs the model on a CUDA device, it is on {self.device}")
        self.capture = capture
        self.failed = False  # a capture failed: the pool lends this decoder no more
        self.weights = weights_key(model)  # the graphs read these addresses: a moved weight makes them stale
        states = self._states_of(cache)
        self.batch_size = states[0].batch_size
        with torch.inference_mode(False):
            # normal tensors (a state prefilled under inference mode cannot be written in place outside it)
            # every state buffer and the device position are views into one allocation, so keeping the state before
            # a step (``undo``) is one copy: grouped by dtype, 450 tensors took 0.69 ms of host time a step
            position = {"pos": torch.zeros((), dtype=torch.int64, device=self.device)}
            self._arena, (position, *self._buffers) = arena_views([position] + [s.tensors() for s in states])
            self._pos = position["pos"]
            # each field's place in the arena: ``release`` hands the cache views into one copy of the arena, which a
            # later ``adopt`` recognises and takes back in one copy
            self._layout = tuple(
                (name, tuple(buffer.shape), buffer.dtype, buffer.data_ptr() - self._arena.data_ptr())
                for buffers in self._buffers
                for name, buffer in buffers.items()
            )
            self._ids = torch.zeros(self.batch_size, 1, dtype=torch.int64, device=self.device)
            self._logits = torch.zeros(self.batch_size, weight.shape[0], dtype=torch.float32, device=self.device)
            self._window_offsets = [torch.arange(a.config.window, device=self.device) for a in self.attention]
            self._sink_index = [torch.arange(a.config.num_sink, device=self.device) for a in self.attention]
        # keyed by (tokens, kind): (1, "step") a step inside a segment, reading the segment's extras kept by
        # (1, "refresh") a step that computes them (the first after an adopt, a read or a capture; one that writes a
        # sink) and (1, "route") the step that starts a segment and routes into the banks; (n, "read") a chunk past
        # the sinks, (n, "read sinks") one that writes sinks
        self._graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self._kept = [KeptExtras() for _ in self.attention]  # each layer's segment extras, static buffers
        self._extras_valid = False  # whether _kept holds the live state's current segment
        self._undoable = False  # whether the last step kept the state before it (``undo``)
        self._before_step: Tensor | None = None  # that state and device position: a copy of the arena
        self._bound: list[BoundedState] = []  # the held cache's states, whose tensors are the buffers
        self._num_sink = max(layer.config.num_sink for layer in self.attention)
        self._fused_norms = all(
            fusable(norm) for block in self.blocks for norm in (block.input_layernorm, block.post_attention_layernorm)
        ) and fusable(self.norm)
        # whether one-token steps may take kernels.step_products (norms and activation in the products' prologues):
        # every block folded (fused input product, fused gate-and-up SiLU MLP), its norms and products in one dtype
        self._prologue_blocks = self._fused_norms and all(
            _prologue_ready(block, layer, weight.dtype)
            for block, layer in zip(self.blocks, self.attention, strict=True)
        )
        self._chunk_ids: dict[int, Tensor] = {}  # the captured chunks' token-id buffers, by length
        self._pool: Any = None  # the graphs share one memory pool
        self.cache: BoundedCache | None = cache
        self.adopt(cache)

    # ------------------------------------------------------------------ public
    def adopt(self, cache: BoundedCache) -> None:
        """Make ``cache``'s states the decoder's buffers: copy their values in, rebind their tensors to them."""
        states = self._states_of(cache)
        if cache is self.cache and self._still_bound(states):
            return  # nothing advanced it outside the decoder: the kept segment extras stay valid too
        if states[0].batch_size != self.batch_size:
            raise GraphDecodeError(f"the cache holds {states[0].batch_size} rows, the decoder {self.batch_size}")
        parked = _PARKED.pop(cache, None)
        if parked is not None and self._take_back(states, parked):
            self.cache = cache
            self._bound = list(states)
            return
        targets: list[Tensor] = []
        sources: list[Tensor] = []
        for state, buffers in zip(states, self._buffers, strict=True):
            for name, buffer in buffers.items():
                current = getattr(state, name)
                if current is not buffer:
                    if current.shape != buffer.shape or current.dtype != buffer.dtype:
                        raise GraphDecodeError(
                            f"state field {name} is {tuple(current.shape)} {current.dtype}, the decoder's "
                            f"{tuple(buffer.shape)} {buffer.dtype}: the cache belongs to another model"
                        )
                    targets.append(buffer)
                    sources.append(current)
        with torch.inference_mode(False), torch.no_grad():
            # batched copies, one per dtype, not one launch per tensor (about 600 for SmolLM2: milliseconds a question)
            copy_tensors(targets, sources)
            for state, buffers in zip(states, self._buffers, strict=True):
                for name, buffer in buffers.items():
                    setattr(state, name, buffer)
                state.decode_view = None  # the reference path's derived view would be stale
            self._pos.fill_(states[0].pos)
        self._extras_valid = False
        self._undoable = False
        self.cache = cache
        self._bound = list(states)

    def capture_all(self) -> None:
        """Capture both graphs now (warm-up, compilation, autotuning), so no later token pays for it."""
        if self.capture:
            self._states_of(self._held())
            with torch.inference_mode(False), torch.no_grad():
                for kind in ("refresh", "route", "step"):  # "step" reads what "refresh" writes
                    if (1, kind) not in self._graphs:
                        self._capture(self._ids, kind)

    def release(self) -> None:
        """Give the cache tensors of its own (copies of the buffers): the decoder can then adopt another cache
        while this one lives on (a session's follow-up questions). The decoder lets go of the cache."""
        if self.cache is None:
            return
        with torch.inference_mode(False), torch.no_grad(), self._on_device():
            held = [
                (state, name, buffer)
                for state, buffers in zip(self._states_of(self.cache), self._buffers, strict=True)
                for name, buffer in buffers.items()
                if getattr(state, name) is buffer
            ]
            if len(held) == len(self._layout):
                # every field still bound: one copy of the arena and a view per field (450 allocations and a
                # multi-tensor copy took about 1 ms of host time an answer)
                copy = self._arena.clone()
                typed = {dtype: copy.view(dtype) for dtype in {buffer.dtype for _, _, buffer in held}}
                views = []
                for (state, name, buffer), (_, _, _, offset) in zip(held, self._layout, strict=True):
                    view = typed[buffer.dtype].as_strided(
                        buffer.shape, buffer.stride(), offset // buffer.element_size()
                    )
                    setattr(state, name, view)
                    views.append(weakref.ref(view))
                _PARKED[self.cache] = _Parked(self._layout, views)
            else:
                copies = [torch.empty_like(buffer) for _, _, buffer in held]
                copy_tensors(copies, [buffer for _, _, buffer in held])
                for (state, name, _), copy in zip(held, copies, strict=True):
                    setattr(state, name, copy)
        self.cache = None  # an idle decoder in a pool must not keep a finished answer's state alive
        self._bound = []
        self._undoable = False

    @property
    def pos(self) -> int:
        """Tokens the state has seen (the position of the next token)."""
        return self._states_of(self._held())[0].pos

    def __call__(self, token_ids: Tensor, *, undoable: bool = False) -> Tensor:
        """One token per row ``(B,)`` or ``(B, 1)`` -> its logits ``(B, vocab)`` float32. ``undoable``: the state
        before the step is kept (one device copy of the state) so that ``undo`` can take the step back: a loop may
        launch the next step before it knows whether generation has stopped, instead of waiting for every token."""
        if token_ids.dim() == 1:
            token_ids = token_ids[:, None]
        if token_ids.shape != self._ids.shape:
            raise GraphDecodeError(f"token_ids must be {tuple(self._ids.shape)}, got {tuple(token_ids.shape)}")
        states = self._check_buffers()
        pos = states[0].pos
        if not pos:
            raise GraphDecodeError("a decode step follows a prompt: read or prefill at least one token first")
        kind = step_kind(pos, self.attention[0].config.segment, self._num_sink, self._extras_valid)
        self._undoable = False
        if undoable:
            self._keep_before_step()
        self._run(states, self._ids, token_ids, kind)
        self._undoable = undoable
        self._extras_valid = True  # every kind but a read leaves the live segment's extras kept
        return self._logits.clone()

    def undo(self) -> None:
        """Take back the last step, made with ``undoable=True``: the state is as it was before it."""
        if not self._undoable:
            raise GraphDecodeError("undo follows a step made with undoable=True, and only once")
        states = self._check_buffers()
        assert self._before_step is not None  # kept by the undoable step
        with torch.inference_mode(False), torch.no_grad(), self._on_device():
            self._arena.copy_(self._before_step)
        for state in states:
            state.pos -= 1
        self._undoable = False
        self._extras_valid = False  # the next step recomputes the segment's extras, not trusting any the undone wrote

    def _keep_before_step(self) -> None:
        with torch.inference_mode(False), torch.no_grad(), self._on_device():
            if self._before_step is None:  # allocated on the first undoable step: one state's device memory
                self._before_step = torch.empty_like(self._arena)
            self._before_step.copy_(self._arena)

    def read(self, token_ids: Tensor, pieces: int = 1) -> Tensor:
        """Read a chunk ``(B, n)`` of prompt or document tokens (a prefill), returning its last token's logits
        ``(B, vocab)`` float32: what ``model(token_ids, cache=cache)`` does, under one graph per chunk length.

        ``n`` and the state's position must be multiples of the segment length (the chunk then routes at each of its
        segment starts, wherever it lies in the stream): ``prefill`` sends the other tokens through the forward.
        ``pieces > 1`` reads the chunk as that many equal pieces in a pipeline (``dispatch.read_pieces``): layer
        ``l`` of piece ``p`` runs beside layer ``l - 1`` of piece ``p + 1`` and each piece's routing on a side
        stream, with the same kernels on the same inputs as pieces read one after another."""
        if token_ids.dim() != 2 or token_ids.shape[0] != self.batch_size:
            raise GraphDecodeError(f"token_ids must be ({self.batch_size}, n), got {tuple(token_ids.shape)}")
        segment, n = self.attention[0].config.segment, token_ids.shape[1]
        states = self._check_buffers()
        if n % segment or states[0].pos % segment:
            raise GraphDecodeError(
                f"a graph-read chunk must start and end on segment boundaries ({segment} tokens): "
                f"{n} tokens from position {states[0].pos}"
            )
        if pieces < 1 or n % (pieces * segment):
            raise GraphDecodeError(f"{n} tokens do not split into {pieces} pieces of whole {segment}-token segments")
        buffer = self._chunk_ids.get(n)
        if buffer is None:
            with torch.inference_mode(False):
                buffer = self._chunk_ids[n] = torch.zeros(self.batch_size, n, dtype=torch.int64, device=self.device)
        # a chunk past the sinks skips their write (a graph node per layer and tensor); only a stream's first
        # tokens need it
        kind = "read" if states[0].pos >= self._num_sink else "read sinks"
        self._run(states, buffer, token_ids, kind if pieces == 1 else f"{kind} in {pieces}")
        self._extras_valid = False
        self._undoable = False
        return self._logits.clone()

    # ------------------------------------------------------------------ internals
    def _take_back(self, states: list[BoundedState], parked: _Parked) -> bool:
        """Adopt states whose fields are still the views a decoder's ``release`` gave them (a follow-up question): one
        copy of that arena into this one. False, changing nothing, if any field was replaced since or the layouts
        differ."""
        if parked.layout is not self._layout and parked.layout != self._layout:
            return False
        fields = [
            getattr(state, name) for state, buffers in zip(states, self._buffers, strict=True) for name in buffers
        ]
        if len(fields) != len(parked.views) or any(
            ref() is not field for ref, field in zip(parked.views, fields, strict=True)
        ):
            return False
        storage = fields[0].untyped_storage()  # the arena's copy, which every view shares
        if storage.nbytes() != self._arena.numel():
            return False
        with torch.inference_mode(False), torch.no_grad(), self._on_device():
            self._arena.copy_(torch.empty(0, dtype=torch.uint8, device=self._arena.device).set_(storage))
            self._pos.fill_(states[0].pos)
        for state, buffers in zip(states, self._buffers, strict=True):
            for name, buffer in buffers.items():
                setattr(state, name, buffer)
            state.decode_view = None
        self._extras_valid = False
        self._undoable = False
        return True

    def _check_buffers(self) -> list[BoundedState]:
        """The held cache's states, which must still be the decoder's buffers."""
        states = self._held().states
        if not self._still_bound(states):
            raise GraphDecodeError("the cache was advanced outside the decoder (a prefill): call adopt(cache) first")
        if any(layer.collect_metrics for layer in self.attention):
            raise GraphDecodeError("graph decode does not collect routing metrics (a layer has collect_metrics=True)")
        return self._bound

    def _still_bound(self, states: Sequence[BoundedState | None]) -> bool:
        """Whether ``states`` are the ones ``adopt`` bound, still holding the buffers. Once per step, so cheap: the
        forward replaces a cache's state objects (``BoundedState.replace``), it never rebinds their fields in place;
        one field each catches a state bound to another decoder since."""
        bound = self._bound
        return len(states) == len(bound) and all(
            state is mine and state.win_k is buffers["win_k"]
            for state, mine, buffers in zip(states, bound, self._buffers, strict=True)
        )

    def _run(self, states: list[BoundedState], ids: Tensor, token_ids: Tensor, kind: str) -> None:
        """``token_ids`` into the static buffer ``ids``, then its graph replayed (captured on first use) or, without
        capture, the step run eagerly; every state advances by the chunk's length."""
        with torch.inference_mode(False), torch.no_grad(), self._on_device():
            ids.copy_(token_ids)
            if self.capture:
                graph = self._graphs.get((ids.shape[1], kind)) or self._capture(ids, kind)
                graph.replay()
            else:
                self._step(states, ids, kind)
        for state in states:
            state.pos += ids.shape[1]

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """Replays and copies on the model's device, whichever device is current (a model on cuda:1)."""
        return torch.cuda.device(self.device) if self.capture else contextlib.nullcontext()

    def _held(self) -> BoundedCache:
        if self.cache is None:
            raise GraphDecodeError("the decoder holds no cache (it was released): adopt one first")
        return self.cache

    def _states_of(self, cache: BoundedCache) -> list[BoundedState]:
        if not isinstance(cache, BoundedCache):
            raise GraphDecodeError(f"graph decode needs a BoundedCache, got {type(cache).__name__}")
        states = cache.states
        if len(states) != len(self.attention) or any(s is None for s in states):
            raise GraphDecodeError("prefill the cache through the model first (every layer needs its state)")
        ready: list[BoundedState] = [s for s in states if s is not None]
        if len({s.pos for s in ready}) != 1:
            raise GraphDecodeError(f"the layers' states are at positions {sorted({s.pos for s in ready})}")
        if any(s.metrics for s in ready) or any(layer.collect_metrics for layer in self.attention):
            raise GraphDecodeError("graph decode does not collect routing metrics (a layer has collect_metrics=True)")
        return ready

    def _step(self, states: list[BoundedState], ids: Tensor, kind: str) -> None:
        """The tokens in ``ids`` (one, or a chunk) from the device position ``self._pos``: the last one's logits into
        ``self._logits``."""
        with step_tables():  # the layers work at the same positions: one set of RoPE tables and ring slots per step
            if " in " in kind:
                normed = self._pipelined_read(states, ids, kind)
            else:
                normed = self._blocks(states, self.embed(ids), kind)
        self._logits.copy_(self.lm_head(normed[:, -1:])[:, -1])  # copy_ converts to float32 in the same pass
        self._pos.add_(ids.shape[1])

    def _blocks(self, states: list[BoundedState], h: Tensor, kind: str) -> Tensor:
        """The decoder blocks on hidden states ``h`` (attention: the bounded step at ``self._pos``; then the MLP),
        and the final norm: returns the normalised last hidden states. Each residual add and the norm after it
        are one fused pass where the norms allow (``kernels.residual_norm``)."""
        norms = [block.input_layernorm for block in self.blocks[1:]] + [self.norm]
        # one token: the norms and the MLP's activation in the prologues of the products that read them (three kernels
        # fewer a layer); a plain step also takes its attention's input product so (the others compute the segment's
        # extras from the normalised row)
        prologues = (
            self._prologue_blocks and h.shape[0] * h.shape[1] == 1 and dispatch.step_products_in_prologue(self.device)
        )
        inputs_in_prologue = prologues and kind == "step" and all(one_pass_step_inputs(a) for a in self.attention)
        delta: Tensor | None = None  # the last block's MLP output while its residual add waits for the next product
        x = h
        if not inputs_in_prologue:
            _, x = self._add_norm(h, None, self.blocks[0].input_layernorm)
        for index, (block, layer, state) in enumerate(zip(self.blocks, self.attention, states, strict=True)):
            projected = None
            if inputs_in_prologue:
                product, norm = layer.input_projection, block.input_layernorm
                assert product is not None  # _prologue_blocks checked every layer
                h, projected = norm_product(h, delta, norm.weight, rms_norm_eps(norm), product.weight, product.bias)
                x = h  # the step reads only its shape
            attended = advance_at_device_position(
                layer,
                state,
                x,
                self._pos,
                self._window_offsets[index],
                self._sink_index[index],
                kind in ("route", "read", "read sinks"),
                self._kept[index] if not kind.startswith("read") else None,
                reuse=kind == "step",
                sinks=kind != "read",
                projected=projected,
            )
            if not prologues:
                h, x = self._add_norm(h, attended, block.post_attention_layernorm)
                h, x = self._add_norm(h, block.mlp(x), norms[index])
                continue
            gate_up, down = silu_gated_mlp(block.mlp)  # type: ignore[misc]  # _prologue_blocks checked it
            norm = block.post_attention_layernorm
            h, both = norm_product(h, attended, norm.weight, rms_norm_eps(norm), gate_up.weight, gate_up.bias)
            delta = activated_product(both, down.weight, down.bias)
            if not inputs_in_prologue or index == len(self.blocks) - 1:
                h, x = self._add_norm(h, delta, norms[index])
                delta = None
        return x

    def _pipelined_read(self, states: list[BoundedState], ids: Tensor, kind: str) -> Tensor:
        """A read of ``ids`` as equal pieces in a wavefront: at time ``t`` piece ``p`` runs layer ``t - p``. Each
        layer's work on a piece is split around its routing: first every live piece's projections, window and
        routing launch (on the piece's side stream, after this layer's routing of the piece before, which wrote
        the banks), then every live piece's attention and MLP on this stream. A piece's layer thus reads the state
        its layer left after the piece before, as in reads one after another, while the routings of different
        pieces (one program per KV head and bank each) run side by side. Returns the last piece's normalised
        hidden states."""
        kind, pieces = kind.rsplit(" in ", 1)[0], int(kind.rsplit(" in ", 1)[1])
        size = ids.shape[1] // pieces
        streams = routing_streams(self.device, pieces) if self.capture else [None] * pieces
        positions = [self._pos + p * size for p in range(pieces)]  # kept alive: step tables key on their ids
        norms = [block.input_layernorm for block in self.blocks[1:]] + [self.norm]
        hidden: list[Tensor] = []
        normed: list[Tensor] = []
        for p in range(pieces):
            h, x = self._add_norm(self.embed(ids[:, p * size : (p + 1) * size]), None, self.blocks[0].input_layernorm)
            hidden.append(h)
            normed.append(x)
        routed: list[Any] = [None] * len(self.blocks)  # each layer's last routing event
        for time in range(len(self.blocks) + pieces - 1):
            live = [(p, time - p) for p in range(pieces) if 0 <= time - p < len(self.blocks)]
            begun = {}
            for p, index in live:
                begun[p] = begin_at_device_position(
                    self.attention[index], states[index], normed[p], positions[p], self._window_offsets[index],
                    self._sink_index[index], True, sinks=kind != "read", routing_stream=streams[p],
                    after=routed[index],
                )  # fmt: skip
                routed[index] = begun[p].routed
            for p, index in live:
                block = self.blocks[index]
                attended = finish_at_device_position(self.attention[index], states[index], begun[p], positions[p])
                hidden[p], normed[p] = self._add_norm(hidden[p], attended, block.post_attention_layernorm)
                hidden[p], normed[p] = self._add_norm(hidden[p], block.mlp(normed[p]), norms[index])
        return normed[-1]

    def _add_norm(self, h: Tensor, delta: Tensor | None, norm: Any) -> tuple[Tensor, Tensor]:
        """``h + delta`` (or ``h``) and its norm: fused for transformers' Llama-family RMSNorm."""
        if self._fused_norms:
            return add_rms_norm(h, delta, norm)
        if delta is not None:
            h = h + delta.to(h.dtype)
        return h, norm(h)

    def _capture(self, ids: Tensor, kind: str) -> torch.cuda.CUDAGraph:
        """Warm up (compile, autotune) on scratch copies of the states, then capture on the buffers."""
        live = self._states_of(self._held())
        saved_pos = self._pos.clone()

        def warm_up() -> None:
            # the step's kernels compiled side by side first: a fresh process would compile them one by one as the
            # step reaches them (about a minute for SmolLM2's ingest and answers on an H100)
            with dispatch.compile_ahead() as compiling:
                if compiling:
                    self._step([state.clone() for state in live], ids, kind)
            self._pos.copy_(saved_pos)
            scratch = [state.clone() for state in live]
            for _ in range(2):
                self._step(scratch, ids, kind)
                self._pos.copy_(saved_pos)

        try:
            graph = capture_step(lambda: self._step(live, ids, kind), warm_up, self.device, self._pool)
        except Exception as error:
            self.failed = True
            step = f"{ids.shape[1]}-token {kind}" if kind.startswith("read") else f"{kind} decode"
            raise GraphCaptureError(f"capturing the {step} step failed: {error}") from error
        # capturing records the step without running it: the live state and position are unchanged
        self._pool = graph.pool()
        self._graphs[(ids.shape[1], kind)] = graph
        self._extras_valid = False  # the warm-up wrote the kept extras from a scratch copy
        return graph


class _Parked(NamedTuple):
    """What ``release`` gave a cache: views of one copy of the decoder's arena, held weakly (the cache's states hold
    them, and they hold the copy; a record must not keep a dropped state alive)."""

    layout: tuple[tuple[str, tuple[int, ...], torch.dtype, int], ...]
    views: list[weakref.ReferenceType[Tensor]]


# by cache, weakly: dropping a cache drops its record
_PARKED: weakref.WeakKeyDictionary[BoundedCache, _Parked] = weakref.WeakKeyDictionary()

ARENA_ALIGNMENT = 256  # bytes: what torch's CUDA allocator gives each tensor, so kernels see the same alignment


def arena_views(groups: list[dict[str, Tensor]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """One byte buffer and, for each dict of tensors, contiguous views into it of the same names, shapes and dtypes,
    holding copies of their values (each view starts on an ``ARENA_ALIGNMENT`` boundary). Copying the whole buffer
    copies every view at once."""
    layout: list[list[tuple[str, int, Tensor]]] = []
    size = 0
    for group in groups:
        placed = []
        for name, tensor in group.items():
            placed.append((name, size, tensor))
            size += -(-tensor.numel() * tensor.element_size() // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
        layout.append(placed)
    device = next(t.device for group in groups for t in group.values())
    arena = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    views: list[dict[str, Tensor]] = []
    for placed in layout:
        group_views = {}
        for name, offset, tensor in placed:
            nbytes = tensor.numel() * tensor.element_size()
            view = arena[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            group_views[name] = view
        views.append(group_views)
    return arena, views


def _prologue_ready(block: Any, layer: BoundedCoDAAttention, dtype: torch.dtype) -> bool:
    """Whether ``block``'s one-token step can take ``kernels.step_products``: a fused input product, a fused SiLU
    gated MLP, and norms and products all in ``dtype``."""
    mlp = silu_gated_mlp(block.mlp)
    if layer.input_projection is None or mlp is None:
        return False
    tensors = [block.input_layernorm.weight, block.post_attention_layernorm.weight, layer.input_projection.weight]
    return all(t.dtype == dtype for t in tensors + [mlp[0].weight, mlp[1].weight])


def bounded_layers(model: nn.Module) -> list[BoundedCoDAAttention]:
    """Every block's bounded layer, or a ``GraphDecodeError`` that says why ``model`` cannot be graph-decoded."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in GRAPH_MODEL_TYPES:
        raise GraphDecodeError(f"graph decode supports dense {', '.join(GRAPH_MODEL_TYPES)} models, not {model_type!r}")
    family: Any = model
    layers: list[BoundedCoDAAttention] = []
    for index, block in enumerate(family.model.layers):
        adapter = getattr(block, "self_attn", None)
        if not (isinstance(adapter, CoDAAttentionAdapter) and isinstance(adapter.layer, BoundedCoDAAttention)):
            raise GraphDecodeError(f"layer {index} is not a bounded CoDA layer: convert the model with a config")
        layers.append(adapter.layer)
    if len({layer.config.segment for layer in layers}) != 1:
        raise GraphDecodeError("graph decode needs one segment length in every layer (they route together)")
    if any(layer.collect_metrics for layer in layers):
        raise GraphDecodeError("graph decode does not collect routing metrics (a layer has collect_metrics=True)")
    return layers


def weights_key(model: nn.Module) -> tuple[tuple[int, int, torch.dtype, torch.device], ...]:
    """Address, version, dtype and device of every parameter and buffer: what a captured graph has baked in. The
    version too, since a graph also reads values derived from the weights once and kept (the noise rotation's
    tables, ``DifferentialCore.noise_tables``): weights loaded in place make it stale.

    Asked at every lend, so the model's tensors are listed once and listed again only after a module, parameter or
    buffer was registered anywhere in the process (``_STRUCTURE``): walking SmolLM2's modules took 1-2 ms of host
    time a lend, a fifth of a short answer's fixed cost (benchmarks/results/speed.md)."""
    listed = _WEIGHT_TENSORS.get(model)
    if listed is None or listed[0] != _STRUCTURE.changes:
        listed = _WEIGHT_TENSORS[model] = (_STRUCTURE.changes, [*model.parameters(), *model.buffers()])
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in listed[1])


class _StructureChanges:
    """Counts registrations of modules, parameters and buffers in this process (torch's global registration hooks
    fire for every ``module.x = ...`` of a module, parameter or buffer, ``register_*`` and ``add_module``): a model's
    list of tensors is stale only when the count moved. A tensor replaced in place (``.to()``, ``load_state_dict``)
    keeps its object, and its address or version says so."""

    def __init__(self) -> None:
        self.changes = 0
        for register in (
            torch.nn.modules.module.register_module_module_registration_hook,
            torch.nn.modules.module.register_module_parameter_registration_hook,
            torch.nn.modules.module.register_module_buffer_registration_hook,
        ):
            register(self._changed)

    def _changed(self, module: nn.Module, name: str, value: Any) -> None:
        self.changes += 1


_STRUCTURE = _StructureChanges()
_WEIGHT_TENSORS: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[Tensor]]] = weakref.WeakKeyDictionary()


def graph_decode_supported(model: nn.Module) -> bool:
    """Whether answers from ``model`` decode through ``GraphModelDecoder``: a dense supported family with every
    layer bounded (``bounded_layers``), on CUDA with the Triton kernels (``kernels.dispatch.graph_decode``)."""
    family: Any = model
    head = getattr(family, "lm_head", None)
    if head is None or not dispatch.graph_decode(head.weight.device):
        return False
    if torch.is_autocast_enabled("cuda"):  # a graph would replay one autocast state whatever the caller's
        return False
    try:
        bounded_layers(model)
    except (GraphDecodeError, AttributeError):
        return False
    return True


class GraphDecoderPool:
    """Decoders of one model, each lent to one generation at a time (their graphs are captured once).

    ``with pool.lend(cache) as decoder:`` adopts ``cache`` into an idle decoder (or a new one) and, at
    the end, gives the cache its own tensors back and returns the decoder. Concurrent generations get
    different decoders, so questions asked at the same time answer as they would one after another.
    The pool holds its model weakly (``shared_decoder_pool`` keys pools by model).

    ``lend`` gives ``None`` instead of a decoder when graphs cannot serve: after a capture failed in this pool
    (``capture_failed``; later generations go through the forward without trying again), or when a decoder
    refuses the cache (``GraphDecodeError``, with a warning that says why). Idle decoders whose model's weights
    have moved (``.to()``, reassigned parameters) are dropped, not replayed.
    """

    def __init__(self, model: nn.Module, keep_idle: int = 4, *, capture: bool = True) -> None:
        self._model = weakref.ref(model)
        self.keep_idle = keep_idle
        self.capture = capture  # False: eager decoders (the CPU tests)
        self._idle: list[GraphModelDecoder] = []
        self._lock = threading.Lock()
        self.capture_failed = False

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise GraphDecodeError("the pool's model has been deleted")
        return model

    @contextlib.contextmanager
    def lend(self, cache: BoundedCache) -> Iterator[GraphModelDecoder | None]:
        if self.capture_failed:
            yield None
            return
        decoder = self._decoder_for(cache)
        if decoder is None:
            yield None
            return
        try:
            yield decoder
        finally:
            decoder.release()
            with self._lock:
                if decoder.failed:
                    self.capture_failed = True
                elif len(self._idle) < self.keep_idle:
                    self._idle.append(decoder)

    def _decoder_for(self, cache: BoundedCache) -> GraphModelDecoder | None:
        """An idle decoder (same rows, same weights) adopting ``cache``, else a new one; None if it refuses."""
        model = self.model
        rows = cache.states[0].batch_size if cache.states and cache.states[0] is not None else None
        current = weights_key(model)
        with self._lock:
            self._idle = [d for d in self._idle if d.weights == current]
            ready = [d for d in self._idle if d.batch_size == rows]
            decoder = ready[-1] if ready else None
            if decoder is not None:
                self._idle.remove(decoder)
        try:
            if decoder is None:
                return GraphModelDecoder(model, cache, capture=self.capture)
            decoder.adopt(cache)
            return decoder
        except GraphDecodeError as error:
            warnings.warn(f"graph decode cannot serve this cache ({error}); decoding through the forward", stacklevel=3)
            return None


_SHARED_POOLS: weakref.WeakKeyDictionary[nn.Module, GraphDecoderPool] = weakref.WeakKeyDictionary()
_SHARED_POOLS_LOCK = threading.Lock()


def shared_decoder_pool(model: nn.Module) -> GraphDecoderPool:
    """The process's pool of graph decoders for ``model``: every ``generate()`` with ``bounded_decoding`` and the
    neural database's answers reuse the graphs captured once, instead of capturing two graphs per call. It lives as
    long as the model does."""
    with _SHARED_POOLS_LOCK:
        pool = _SHARED_POOLS.get(model)
        if pool is None:
            pool = _SHARED_POOLS[model] = GraphDecoderPool(model)
        return pool
