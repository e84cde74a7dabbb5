"""``BoundedCoDAAttention``: differential attention whose inference state has a fixed size.

One code path serves every way of feeding tokens: ``prefill_chunked`` (any block size),
``step`` (one token) and the parallel training ``forward`` all call ``_advance``, which

1. projects the new tokens (write gate included) and lines them up after the window held in
   the state, in token order (the "extended" sequence of ``W + n`` tokens);
2. scans the segment boundaries inside the chunk: at each one the ``S`` tokens that leave
   the window are routed into the banks (``kernels.routing_reference.route_segment``), and the bank snapshot each
   segment's queries see is kept;
3. attends every query to sinks + window + its segment's bank snapshot in one block-sparse
   pass (``segment_attention.attend_segments``; for inference on the CPU the same outputs from
   ``banded_attention.attend_banded``), cost ``O(n * (W + Me + Ms))``;
4. writes the new tokens into the ring and the sinks.

Because routing happens only at segment boundaries and only ever reads tokens that are
already in the extended sequence, the outputs and the state after token ``t`` depend on
tokens ``0..t`` only, never on how the input was chunked (docs/semantics.md section 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from . import decode_view, step_tables
from .banded_attention import attend_banded
from .config import BoundedConfig
from .differential import DifferentialCore, HeadNorm
from .fused_linear import fusable_linears, fuse_linears
from .kernels.diff_attention import (
    SEGMENT_WINDOW,
    Pattern,
    Rotation,
    fused_attention,
    rotated_fused_attention,
    rotation_in_forward,
)
from .kernels.dispatch import (
    decode_view_allowed,
    fused_bounded_chunk,
    inference_attention,
    inference_routing,
    prefill_routes_ahead,
)
from .kernels.gated_activation import gate_sigmoid
from .kernels.rope import rotate_keys, stack_rotated_queries
from .kernels.routing import route_chunk_triton
from .kernels.routing_cpu import route_chunk_inference
from .kernels.routing_reference import route_chunk
from .kernels.segment_extras import build_extras, build_extras_reference
from .primitives import HeadwiseRMSNorm, RopeLayout, apply_rope
from .routing_ahead import RoutedAhead, RoutingAhead
from .segment_attention import attend_segments
from .state import BANK_FIELDS, Banks, BoundedState

CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(BoundedConfig))
_HEAD_NORM_ALIASES = {
    "rms": "rms",
    "rmsnorm": "rms",
    "headwise_rms": "rms",
    "headwise": "rms",
    "identity": "identity",
    "none": "identity",
}


class BoundedCoDAAttention(nn.Module):
    """Bounded differential grouped-query attention (docs/api.md, docs/semantics.md).

    Args:
        embed_dim, num_heads, num_kv_heads: model width ``D``, query heads ``H``, KV heads.
        window, num_landmarks_exact, num_landmarks_summary: slots ``W``, ``Me``, ``Ms``.
        rope_base, rope_layout, rope_scaling, max_position_embeddings: RoPE settings.
        head_dim: per-head size (defaults to ``D / H``).
        config: a ``BoundedConfig``. The seed's ``window``, ``num_landmarks_exact`` and
            ``num_landmarks_summary``, and any other ``BoundedConfig`` field given as a keyword
            (``num_sink=4``, ``tau_exact=0.5``, ...), build one instead; pass one way or the other.
        head_norm (alias ``head_norm_mode``), lambda_init_bias, theta_init, exact_identity,
            qkv_bias, o_bias, qk_norm, qk_norm_eps, softmax_scale: see ``DifferentialCore``.
        collect_metrics: count routing events into ``state.metrics`` (host synchronisation).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        window: int | None = None,
        num_landmarks_exact: int | None = None,
        num_landmarks_summary: int | None = None,
        *,
        rope_base: float = 10000.0,
        rope_layout: RopeLayout = "half",
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int | None = None,
        head_dim: int | None = None,
        config: BoundedConfig | None = None,
        head_norm: HeadNorm | None = None,
        head_norm_mode: str | None = None,
        lambda_init_bias: float = -6.0,
        theta_init: float = 0.5,
        exact_identity: bool = False,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        softmax_scale: float | None = None,
        collect_metrics: bool = False,
        **config_fields: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(config_fields) - CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}: neither layer options nor BoundedConfig fields")
        seed_names = {
            "window": window,
            "num_landmarks_exact": num_landmarks_exact,
            "num_landmarks_summary": num_landmarks_summary,
        }
        given = {key: value for key, value in {**seed_names, **config_fields}.items() if value is not None}
        if config is None:
            config = BoundedConfig(**given)
        elif given:
            raise TypeError(f"pass either config or the keywords {sorted(given)}, not both")
        self.config = config
        if head_norm is not None and head_norm_mode is not None:
            raise TypeError("pass head_norm or its alias head_norm_mode, not both")
        norm_name = head_norm if head_norm is not None else (head_norm_mode or "rms")
        if norm_name not in _HEAD_NORM_ALIASES:
            raise ValueError(f"head_norm must be one of {sorted(_HEAD_NORM_ALIASES)}, got {norm_name!r}")
        self.core = DifferentialCore(
            embed_dim,
            num_heads,
            num_kv_heads,
            head_dim,
            differential=config.differential,
            head_norm=_HEAD_NORM_ALIASES[norm_name],  # type: ignore[arg-type]
            lambda_init_bias=lambda_init_bias,
            theta_init=theta_init,
            exact_identity=exact_identity,
            rope_base=rope_base,
            rope_layout=rope_layout,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=qk_norm,
            qk_norm_eps=qk_norm_eps,
            softmax_scale=softmax_scale,
        )
        self.gate_proj = nn.Linear(embed_dim, num_kv_heads)
        nn.init.constant_(self.gate_proj.bias, config.gate_bias_init)
        self.summary_rate_logit = nn.Parameter(torch.full((num_kv_heads,), float(config.summary_rate_logit_init)))
        self.collect_metrics = collect_metrics
        # set by fuse_input_projections (inference): queries, keys, values, lambda and write gate in one product
        self.input_projection: nn.Linear | None = None

    # ------------------------------------------------------------------ shapes
    @property
    def embed_dim(self) -> int:
        return self.core.embed_dim

    @property
    def num_heads(self) -> int:
        return self.core.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.core.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.core.head_dim

    def full_cache_bytes(self, tokens: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes a full (unbounded) KV cache would need for ``tokens`` tokens: keys plus values."""
        itemsize = torch.empty((), dtype=dtype or self.core.q_proj.weight.dtype).element_size()
        return 2 * batch_size * tokens * self.num_kv_heads * self.head_dim * itemsize

    # ------------------------------------------------------------------ projections
    def fuse_input_projections(self) -> bool:
        """For inference: the query, key, value, lambda and write-gate projections become one matrix product
        (``fused_linear``; the original modules read their rows of it). Returns whether it fused: not when any of
        them is not a plain ``nn.Linear`` (LoRA adapters: ``models.lora.merge_lora`` first) or it already did."""
        core = self.core
        parts = [
            core.q_proj,
            core.k_proj,
            core.v_proj,
            *([core.lambda_proj] if core.lambda_proj is not None else []),
            self.gate_proj,
        ]
        if self.input_projection is not None or not fusable_linears(parts):
            return False
        fused, slices = fuse_linears(parts)  # type: ignore[arg-type]
        self.input_projection = fused
        core.q_proj, core.k_proj, core.v_proj = slices[:3]  # type: ignore[assignment]
        if core.lambda_proj is not None:
            core.lambda_proj = slices[3]  # type: ignore[assignment]
        self.gate_proj = slices[-1]  # type: ignore[assignment]
        return True

    def project_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """``x (B, n, D)`` -> ``core.project``'s q, k, v, lambda and the write gate ``g (B, Hkv, n)`` float32: one
        product and one sigmoid for lambda and the gate once ``fuse_input_projections`` ran."""
        core = self.core
        if self.input_projection is None:
            q, k, v, lam = core.project(x)
            return q, k, v, lam, torch.sigmoid(self.gate_proj(x).float()).transpose(1, 2)
        width_q, width_kv = core.num_heads * core.head_dim, core.num_kv_heads * core.head_dim
        fused = self.input_projection(x)
        gate_width = fused.shape[-1] - width_q - 2 * width_kv
        q, k, v, logits = fused.split([width_q, width_kv, width_kv, gate_width], dim=-1)
        gates = gate_sigmoid(logits).transpose(1, 2)  # (B, [H +] Hkv, n) float32: lambda's heads first
        lam = gates[:, : core.num_heads] if core.lambda_proj is not None else None
        q, k, v, lam = core.split_heads(q, k, v, lam)
        return q, k, v, lam, gates[:, gates.shape[1] - core.num_kv_heads :]

    def project_keys(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The part of ``project_inputs`` that routing reads, for a layer whose projections are not fused, launched
        before the queries' products (``project_queries``) so that a routing kernel on another stream starts while
        they run: ``x (B, n, D)`` -> k and v ``(B, Hkv, n, Dh)`` and the write gate ``g (B, Hkv, n)`` float32.
        A fused layer's one product stays one (``project_inputs``: one launch, and hooks on it see every call)."""
        if self.input_projection is not None:
            raise ValueError("project_keys is for a layer whose input projections are not fused; use project_inputs")
        k, v = self.core.project_keys(x)
        return k, v, torch.sigmoid(self.gate_proj(x).float()).transpose(1, 2)

    def project_queries(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The rest of ``project_inputs`` after ``project_keys``: q ``(B, H, n, Dh)`` and lambda ``(B, H, n)``
        float32 (None when not differential)."""
        if self.input_projection is not None:
            raise ValueError("project_queries is for a layer whose input projections are not fused; use project_inputs")
        return self.core.project_queries(x)

    # ------------------------------------------------------------------ state
    def init_state(
        self,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> BoundedState:
        """A fresh, empty state (defaults: the layer's device and dtype)."""
        weight = self.core.q_proj.weight
        return BoundedState.empty(
            self.config,
            batch_size,
            self.core.num_kv_heads,
            self.core.head_dim,
            device if device is not None else weight.device,
            dtype if dtype is not None else weight.dtype,
        )

    def cache_bytes(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of the state for ``batch_size`` rows: the same after 10 or 100,000 tokens."""
        return self.init_state(batch_size, device="meta", dtype=dtype).nbytes()

    def check_state(self, state: BoundedState, batch_size: int) -> None:
        """Raise an error naming the mismatch if ``state`` cannot continue in this layer."""
        if not isinstance(state, BoundedState):
            raise TypeError(f"state must be a BoundedState, got {type(state).__name__}")
        if state.config != self.config:
            ours, theirs = self.config.to_dict(), state.config.to_dict()
            diff = {k: (theirs[k], ours[k]) for k in ours if ours[k] != theirs[k]}
            raise ValueError(f"state was made for another config; (state, layer) differ in {diff}")
        if (state.num_kv_heads, state.head_dim) != (self.core.num_kv_heads, self.core.head_dim):
            raise ValueError(
                f"state has {state.num_kv_heads} KV heads of size {state.head_dim}, the layer "
                f"{self.core.num_kv_heads} of size {self.core.head_dim}"
            )
        if state.batch_size != batch_size:
            raise ValueError(f"state has batch size {state.batch_size}, x has batch size {batch_size}")
        weight = self.core.q_proj.weight
        if state.dtype != weight.dtype:
            raise TypeError(f"state has dtype {state.dtype}, the layer's weights are {weight.dtype}")
        if state.device != weight.device:
            raise ValueError(f"state is on {state.device}, the layer's weights are on {weight.device}")

    # ------------------------------------------------------------------ public paths
    def forward(
        self, x: Tensor, state: BoundedState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, BoundedState]:
        """Training path: the whole sequence ``x (B, L, D)`` in parallel, bounded semantics.

        Starts from ``state`` (a fresh one if None) without modifying it; with
        ``return_state`` also returns the state after the last token (its tensors keep their
        autograd history; ``.detach()`` it for truncated backpropagation).
        """
        self.core.check_input(x)
        if state is None:
            state = self.init_state(x.shape[0])
        self.check_state(state, x.shape[0])
        y, fields, counts = self._advance(x, state)
        new_state = state.replace(**fields, metrics=dict(state.metrics))
        self._record_metrics(new_state, counts)
        return (y, new_state) if return_state else y

    @overload
    def prefill_chunked(
        self,
        x: Tensor,
        state: BoundedState,
        block_size: int = 256,
        *,
        return_outputs: Literal[True] = True,
        write_cache: bool = True,
    ) -> tuple[Tensor, BoundedState]: ...

    @overload
    def prefill_chunked(
        self,
        x: Tensor,
        state: BoundedState,
        block_size: int = 256,
        *,
        return_outputs: Literal[False],
        write_cache: bool = True,
    ) -> tuple[None, BoundedState]: ...

    def prefill_chunked(
        self,
        x: Tensor,
        state: BoundedState,
        block_size: int = 256,
        *,
        return_outputs: bool = True,
        write_cache: bool = True,
    ) -> tuple[Tensor | None, BoundedState]:
        """Process ``x (B, L, D)`` in blocks of ``block_size`` tokens; returns ``(y, state)``.

        The result does not depend on ``block_size``. ``return_outputs=False`` returns
        ``None`` for ``y`` (ingest without keeping outputs); ``write_cache=False`` leaves
        ``state`` untouched and returns the advanced copy.
        """
        self.core.check_input(x)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.check_state(state, x.shape[0])
        if not write_cache:
            state = state.clone()
        outputs: list[Tensor] = []
        starts = range(0, x.shape[1], block_size)
        ahead = self._routing_ahead(state, x, chunks=len(starts))
        begun: list[_ChunkWork | Tensor] = []
        for start in starts:
            work, fields, counts = self._begin_chunk(x[:, start : start + block_size], state, ahead)
            for name, value in fields.items():
                setattr(state, name, value)
            self._record_metrics(state, counts)
            begun.append(work)
            # in turn, a chunk attends at once; ahead, the chunk before attends once this one's routing is launched
            if ahead is None or len(begun) > 1:
                y = self._finish_chunk(begun.pop(0))
                if return_outputs:
                    outputs.append(y)
        for work in begun:  # ahead: the last chunk
            y = self._finish_chunk(work)
            if return_outputs:
                outputs.append(y)
        return (torch.cat(outputs, dim=1) if return_outputs else None), state

    def step(self, x_t: Tensor, state: BoundedState) -> tuple[Tensor, BoundedState]:
        """One token: ``x_t (B, 1, D)`` (or ``(B, D)``) -> ``(y_t (B, 1, D), state)``."""
        if isinstance(x_t, Tensor) and x_t.dim() == 2:
            x_t = x_t[:, None]
        self.core.check_input(x_t)
        if x_t.shape[1] != 1:
            raise ValueError(f"step takes one token, got x_t of shape {tuple(x_t.shape)}; use prefill_chunked")
        self.check_state(state, x_t.shape[0])
        y, fields, counts = self._advance(x_t, state)
        for name, value in fields.items():
            setattr(state, name, value)
        self._record_metrics(state, counts)
        return y, state

    # ------------------------------------------------------------------ internals
    @property
    def eta(self) -> Tensor:
        """Per-KV-head EMA rate of the summary bank, in (0, 1)."""
        return torch.sigmoid(self.summary_rate_logit)

    def _routing_ahead(self, state: BoundedState, x: Tensor, chunks: int) -> RoutingAhead | None:
        """A side-stream router for a prefill of ``chunks`` chunks, where routing ahead applies: more than one chunk,
        the fused GPU path, no metrics, no gradients through the routing, not inside a graph capture, and
        ``dispatch.prefill_routes_ahead``."""
        if chunks < 2 or self.collect_metrics or x.device.type != "cuda" or not fused_bounded_chunk(x.device):
            return None
        if torch.cuda.is_current_stream_capturing() or not prefill_routes_ahead():
            return None
        banks = Banks(*(getattr(state, name) for name in BANK_FIELDS))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *banks, *self.parameters())):
            return None
        ahead = RoutingAhead(banks)
        for name, value in zip(BANK_FIELDS, ahead.banks, strict=True):
            setattr(state, name, value)
        return ahead

    def _record_metrics(self, state: BoundedState, counts: dict[str, float] | None) -> None:
        if counts is not None:
            state.add_metrics(counts)
            state.metrics.update(state.fill_ratios())

    def _advance(self, x: Tensor, state: BoundedState) -> tuple[Tensor, dict[str, Any], dict[str, float] | None]:
        """Process one chunk: the outputs, the state's new field values, routing counts."""
        work, fields, metrics = self._begin_chunk(x, state)
        return self._finish_chunk(work), fields, metrics

    def _finish_chunk(self, work: _ChunkWork | Tensor) -> Tensor:
        """A begun chunk's output: its attention, or the decode view's step output ``_begin_chunk`` already made."""
        return work if isinstance(work, Tensor) else self._attend_chunk(work)

    def _begin_chunk(
        self, x: Tensor, state: BoundedState, ahead: RoutingAhead | None = None
    ) -> tuple[_ChunkWork | Tensor, dict[str, Any], dict[str, float] | None]:
        """Everything of a chunk but its attention: projections, the window extended, sinks, routing (launched on
        ``ahead``'s side stream when given), and the state's new field values. A one-token step that the decode view
        serves is done here and returns its output in place of the chunk's work."""
        cfg, core = self.config, self.core
        W, Ns = cfg.window, cfg.num_sink
        n, start = x.shape[1], state.pos
        device = x.device
        q, k, v, lam, g = self.project_inputs(x)  # g: (B, Hkv, n)
        if cfg.position_mode == "absolute":
            cos, sin = core.rope.cos_sin(torch.arange(start, start + n, device=device), torch.float32)
            k = apply_rope(k.float(), cos, sin, core.rope.layout).to(k.dtype)
        fused = fused_bounded_chunk(device)
        if n == 1 and not fused and not self.collect_metrics and not torch.is_grad_enabled() and decode_view_allowed():
            if start % cfg.segment and decode_view.applies(cfg, start):  # a segment's first token routes: below
                return self._step_on_view(q, k, v, lam, g, state)

        # The window's tokens in token order, then the chunk: tokens start-W .. start+n-1.
        ring = torch.arange(start - W, start, device=device) % W
        ext_k = torch.cat([state.win_k.index_select(2, ring), k], dim=2)
        ext_v = torch.cat([state.win_v.index_select(2, ring), v], dim=2)
        ext_g = torch.cat([state.win_g.index_select(2, ring), g], dim=2)

        sink_k, sink_v = state.sink_k, state.sink_v
        if start < Ns:
            new = torch.arange(start, min(Ns, start + n), device=device)
            sink_k = sink_k.index_copy(2, new, k[:, :, : new.numel()].to(sink_k.dtype))
            sink_v = sink_v.index_copy(2, new, v[:, :, : new.numel()].to(sink_v.dtype))

        metrics: dict[str, float] | None = {} if self.collect_metrics else None
        banks = Banks(*(getattr(state, name) for name in BANK_FIELDS))
        eta = self.eta
        routing_grads = torch.is_grad_enabled() and any(t.requires_grad for t in (*banks, ext_k, ext_v, ext_g, eta))
        routed: RoutedAhead | None = None
        if ahead is not None:
            # the side stream routes ahead's own copy of the banks in place; attention waits for it
            routed = ahead.route(ext_k, ext_v, ext_g, start=start, n=n, eta=eta, config=cfg)
            banks, bank_k, bank_v, bank_bias = ahead.banks, routed.bank_k, routed.bank_v, routed.bank_bias
        elif fused and metrics is None and not routing_grads:
            # one launch for every segment of the chunk; training (gradients through the bank
            # writes) and metrics stay on the reference
            banks, bank_k, bank_v, bank_bias = route_chunk_triton(
                banks, ext_k, ext_v, ext_g, start=start, n=n, eta=eta, config=cfg
            )
        elif metrics is None and not routing_grads and inference_routing(device):
            banks, bank_k, bank_v, bank_bias = route_chunk_inference(
                banks, ext_k, ext_v, ext_g, start=start, n=n, eta=eta, config=cfg
            )
        else:
            banks, bank_k, bank_v, bank_bias = route_chunk(
                banks, ext_k, ext_v, ext_g, start=start, n=n, eta=eta, config=cfg, metrics=metrics
            )

        kept = min(n, W)
        slots = torch.arange(start + n - kept, start + n, device=device) % W
        fields: dict[str, Any] = dict(zip(BANK_FIELDS, banks, strict=True))
        fields.update(
            sink_k=sink_k,
            sink_v=sink_v,
            win_k=state.win_k.index_copy(2, slots, k[:, :, n - kept :].to(state.win_k.dtype)),
            win_v=state.win_v.index_copy(2, slots, v[:, :, n - kept :].to(state.win_v.dtype)),
            win_g=state.win_g.index_copy(2, slots, g[:, :, n - kept :]),
            position=state.position + n,
            pos=start + n,
        )
        work = _ChunkWork(q, lam, ext_k, ext_v, sink_k, sink_v, bank_k, bank_v, bank_bias, start, fused, routed)
        return work, fields, metrics

    def _attend_chunk(self, work: _ChunkWork) -> Tensor:
        """A chunk's attention and output projection, once its routing is done (waited for when it ran ahead)."""
        cfg, core = self.config, self.core
        if work.routed is not None:
            work.routed.wait()
        if work.fused:
            return self.attend_fused(
                work.q, work.lam, work.ext_k, work.ext_v, work.sink_k, work.sink_v,
                work.bank_k, work.bank_v, work.bank_bias, work.start,
            )  # fmt: skip
        n = work.q.shape[2]
        read = (work.q, work.ext_k, work.ext_v, work.sink_k, work.sink_v, work.bank_k, work.bank_v, work.bank_bias)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in read)
        # more than one segment's rows and no gradients: the banded path (window keys rotated once per
        # chunk); a step or a short chunk scores only its own rows on the reference
        banded = n > cfg.segment and not needs_grad and inference_attention(work.q.device)
        attended = (attend_banded if banded else attend_segments)(
            core.stack_queries(work.q),
            work.ext_k,
            work.ext_v,
            work.sink_k,
            work.sink_v,
            work.bank_k,
            work.bank_v,
            work.bank_bias,
            start=work.start,
            config=cfg,
            rope=core.rope,
            scale=core.softmax_scale,
        )
        return core.combine(attended, work.lam)

    def _step_on_view(
        self, q: Tensor, k: Tensor, v: Tensor, lam: Tensor | None, g: Tensor, state: BoundedState
    ) -> tuple[Tensor, dict[str, Any], None]:
        """One token inside a segment on the reference path, from the segment's cached key block
        (decode_view.py): no routing happens inside a segment, so only the window's ring changes."""
        cfg, core = self.config, self.core
        start = state.pos
        view = decode_view.view_for(state, cfg, core.rope)
        attended = decode_view.attend_step(
            view, core.stack_queries(q), k, v, config=cfg, rope=core.rope, scale=core.softmax_scale
        )
        slot = torch.full((1,), start % cfg.window, device=q.device)  # a fill, not a copy from the host
        fields: dict[str, Any] = {
            "win_k": state.win_k.index_copy(2, slot, k.to(state.win_k.dtype)),
            "win_v": state.win_v.index_copy(2, slot, v.to(state.win_v.dtype)),
            "win_g": state.win_g.index_copy(2, slot, g),
            "position": state.position + 1,
            "pos": start + 1,
            "decode_view": view,
        }
        decode_view.follow(view, state, fields)
        return core.combine(attended, lam), fields, None

    def attend_fused(
        self,
        q: Tensor,
        lam: Tensor | None,
        ext_k: Tensor,
        ext_v: Tensor,
        sink_k: Tensor,
        sink_v: Tensor,
        bank_k: Tensor | None,
        bank_v: Tensor | None,
        bank_bias: Tensor | None,
        start: int | Tensor,
        extras: SegmentExtras | None = None,
        segment_window: bool = False,
        into: Tensor | None = None,
    ) -> Tensor:
        """The fused kernel's path: outputs ``(B, n, D)`` of tokens ``start .. start + n - 1``.
        ``decode.CapturedDecoder`` calls it inside its CUDA graph.

        RoPE angles come from float64 positions, so rotating queries at ``t`` and window keys
        at ``j`` gives the relative mode's ``t - j`` distances to float32 rounding however long
        the stream. Sinks and bank slots sit at per-segment positions (docs/semantics.md section 4), so they are
        rotated once per segment (``segment_extras``) and handed to the kernel as that segment's extra keys;
        ``extras`` given (a one-token step inside a segment whose extras a graph decoder kept) skips that.
        ``segment_window``: ``ext_k``/``ext_v`` are not the window in token order but a graph decoder's buffer of the
        segment's window (``decode.KeptExtras``: tokens ``b - W + S ..``, keys already rotated), read in place.
        ``into``: where to write the outputs (``project_out``).
        """
        cfg, core = self.config, self.core
        W = cfg.window
        B, H, n, D = q.shape
        # under autocast q is bf16 while a float32 model's state is float32: one dtype for the kernel
        ext_k, ext_v = ext_k.to(q.dtype), ext_v.to(q.dtype)
        device = q.device
        rope, layout = core.rope, core.rope.layout
        # Without autograd, one Triton pass rotates and stacks (no float32 temporaries).
        one_pass = not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (q, ext_k, *(t for t in (bank_k,) if t is not None), *self.parameters())
        )
        rotate = _one_pass_rotate if one_pass else _autograd_rotate
        if extras is None:
            if bank_k is None or bank_v is None or bank_bias is None:
                raise ValueError("attend_fused needs the banks' view or the segment's extras")
            extras = self.segment_extras(sink_k, sink_v, bank_k, bank_v, bank_bias, start, q.dtype, one_pass)
        # the tables depend on the start and the shape only: inside a model step's step_tables() the layers share
        # them (a device start is the step's one position tensor)
        at = ("device", id(start)) if isinstance(start, Tensor) else start
        cos, sin = step_tables.cos_sin_range(rope, ("queries", at, n), start, n)
        rotation = None
        if one_pass:
            # float32 tables, as the rotation kernel reads them, kept by the core between chunks and steps
            tables = core.noise_tables()
            t_cos, t_sin = tables if tables is not None else (None, None)
            if rotation_in_forward(q, SEGMENT_WINDOW if segment_window else W):  # rotated in the kernel's prologue
                rotation = Rotation(cos.float().contiguous(), sin.float().contiguous(), t_cos, t_sin, layout)
                queries = q
            else:
                queries = stack_rotated_queries(q, cos, sin, t_cos, t_sin, core.num_kv_heads, layout)
        else:
            queries = core.stack_queries(apply_rope(q.float(), cos, sin, layout).to(q.dtype))
        if cfg.position_mode == "relative" and not segment_window:
            cos, sin = step_tables.cos_sin(
                rope, ("window", at, W, n), lambda: start - W + torch.arange(W + n, device=device)
            )
            ext_k = rotate(ext_k, cos, sin, layout)
        return self.attend_stacked(queries, lam, ext_k, ext_v, start, extras, segment_window, into, rotation)

    def attend_stacked(
        self,
        stacked: Tensor,
        lam: Tensor | None,
        ext_k: Tensor,
        ext_v: Tensor,
        start: int | Tensor,
        extras: SegmentExtras,
        segment_window: bool = False,
        into: Tensor | None = None,
        rotation: Rotation | None = None,
    ) -> Tensor:
        """``attend_fused`` from its rotated, stacked queries ``(B, Hkv, streams, n, Dh)`` on: the kernel over the
        window keys as given (rotated, or a graph decoder's segment buffer) and the segment's extras, then ``W_o``.
        A graph decoder's plain step comes here directly (``kernels.step_inputs`` stacks its queries).

        ``into``: where to write the outputs (``project_out``). ``rotation``: ``stacked`` is instead the projected
        queries ``(B, H, n, Dh)`` before RoPE, which the kernel rotates in its prologue
        (``diff_attention.rotated_fused_attention``)."""
        cfg, core = self.config, self.core
        W, S, Ns = cfg.window, cfg.segment, cfg.num_sink
        B, D = stacked.shape[0], stacked.shape[-1]
        n = stacked.shape[-2]
        H = core.num_heads
        norm = core.head_norm if isinstance(core.head_norm, HeadwiseRMSNorm) else None
        common: dict[str, Any] = dict(
            q_start=start,
            k_offset=SEGMENT_WINDOW if segment_window else W,
            scale=core.softmax_scale,
            pattern=Pattern(bounded=True, window=W, segment=S, num_sink=Ns),
            extra_k=extras.keys,
            extra_v=extras.values,
            extra_bias=extras.bias,
            norm_weight=norm.weight if norm is not None else None,
            eps=norm.eps if norm is not None else 1e-6,
        )
        if rotation is None:
            out = fused_attention(stacked, ext_k, ext_v, lam, **common)
        else:
            out = rotated_fused_attention(stacked, rotation, core.num_kv_heads, ext_k, ext_v, lam, **common)
        return self.project_out(out.reshape(B, n, H * D), into)

    def project_out(self, heads: Tensor, into: Tensor | None = None) -> Tensor:
        """``W_o`` of the heads' outputs ``heads (B, n, H * Dh)``: ``(B, n, D)``.

        ``into`` (contiguous, ``(B, n, D)``): the outputs are written there and it is returned, which saves a copy
        where the caller keeps them in a buffer of its own (``CapturedPrefill``'s graphs). A plain ``nn.Linear`` of the
        heads' dtype, without hooks, autocast or gradients, writes it directly (one matrix product); anything else
        (a LoRA adapter's term, a hook, another dtype) runs the module's own forward and copies."""
        o_proj = self.core.o_proj
        if into is None:
            return o_proj(heads)
        B, n = heads.shape[0], heads.shape[1]
        width = o_proj.weight.shape[0]
        if not into.is_contiguous() or into.shape != (B, n, width):
            raise ValueError(f"into must be a contiguous tensor of shape {(B, n, width)}, got "
                             f"{tuple(into.shape)} (contiguous: {into.is_contiguous()})")  # fmt: skip
        weight, bias = o_proj.weight, o_proj.bias
        plain = type(o_proj) is nn.Linear and not (o_proj._forward_hooks or o_proj._forward_pre_hooks)
        if (
            not plain
            or into.dtype != heads.dtype
            or weight.dtype != heads.dtype
            or torch.is_autocast_enabled(heads.device.type)
            or (torch.is_grad_enabled() and (weight.requires_grad or heads.requires_grad))
        ):
            into.copy_(o_proj(heads))
            return into
        rows, into_rows = heads.reshape(B * n, heads.shape[2]), into.view(B * n, width)
        if bias is None:
            torch.mm(rows, weight.t(), out=into_rows)
        else:
            torch.addmm(bias, rows, weight.t(), out=into_rows)
        return into

    def segment_extras(
        self,
        sink_k: Tensor,
        sink_v: Tensor,
        bank_k: Tensor,
        bank_v: Tensor,
        bank_bias: Tensor,
        start: int | Tensor,
        dtype: torch.dtype,
        one_pass: bool = True,
    ) -> SegmentExtras:
        """What each segment's queries see beside the window: the sinks and bank slots, rotated to their per-segment
        positions, with their logit offsets (``bank_* (B, Hkv, nseg, M, ...)``, one snapshot per segment the chunk
        from ``start`` touches). Within a segment none of it changes once the sinks are written, which lets a graph
        decoder compute it once per segment."""
        cfg, core = self.config, self.core
        W, S, Ns = cfg.window, cfg.segment, cfg.num_sink
        sink_k, sink_v, bank_k, bank_v = (t.to(dtype) for t in (sink_k, sink_v, bank_k, bank_v))
        nseg, D = bank_k.shape[2], bank_k.shape[4]
        device = bank_k.device
        rope, layout = core.rope, core.rope.layout
        relative = cfg.position_mode == "relative"
        at = ("device", id(start)) if isinstance(start, Tensor) else start

        def segment_starts() -> Tensor:
            return (start // S + torch.arange(nseg, device=device)) * S

        def sink_positions() -> Tensor:
            i = torch.arange(Ns, device=device)
            return torch.maximum(i, segment_starts()[:, None] - W - Ns + i)

        sink_angles = bank_angles = None
        if relative:  # every slot of a segment sits at b - W: one angle per segment; sink i at its own position
            bank_angles = step_tables.cos_sin(rope, ("bank angles", at, S, W, nseg), lambda: segment_starts() - W)
            if Ns:
                cos, sin = step_tables.cos_sin(rope, ("sinks", at, S, W, Ns, nseg), sink_positions)
                sink_angles = (cos.reshape(nseg, Ns, D), sin.reshape(nseg, Ns, D))
            else:
                sink_angles = (bank_angles[0].new_empty(nseg, 0, D), bank_angles[1].new_empty(nseg, 0, D))
        args = (sink_k, sink_v, bank_k, bank_v, bank_bias, dtype, sink_angles, bank_angles, layout)
        if one_pass:  # inference: one pass over sinks and snapshots (kernels/segment_extras.py)
            return SegmentExtras(*build_extras(*args))
        return SegmentExtras(*build_extras_reference(*args, rotate=_autograd_rotate))  # gradients flow through

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"window={cfg.window}, exact={cfg.num_landmarks_exact}, summary={cfg.num_landmarks_summary}, "
            f"sinks={cfg.num_sink}, segment={cfg.segment}, position_mode={cfg.position_mode}"
        )


@dataclasses.dataclass
class SegmentExtras:
    """A segment's extra keys for the fused kernel (``BoundedCoDAAttention.segment_extras``): ``keys``/``values``
    ``(B, Hkv, nseg, Ns + M, Dh)`` and ``bias`` ``(B, Hkv, nseg, Ns + M)``. (The noise rotation's tables are the
    core's, ``DifferentialCore.noise_tables``.)"""

    keys: Tensor
    values: Tensor
    bias: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.keys, self.values, self.bias]

    def clone(self) -> SegmentExtras:
        return SegmentExtras(self.keys.clone(), self.values.clone(), self.bias.clone())

    def copy_(self, other: SegmentExtras) -> None:
        """Write ``other``'s values into these tensors (static buffers of a captured graph)."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs)


@dataclasses.dataclass
class _ChunkWork:
    """What a chunk's attention reads, between ``_begin_chunk`` and ``_attend_chunk``: its queries and lambda, the
    window extended by its tokens, the sinks, the banks as each of its segments sees them, the start, whether the
    fused kernel attends, and its routing when that runs ahead on a side stream."""

    q: Tensor
    lam: Tensor | None
    ext_k: Tensor
    ext_v: Tensor
    sink_k: Tensor
    sink_v: Tensor
    bank_k: Tensor
    bank_v: Tensor
    bank_bias: Tensor
    start: int
    fused: bool
    routed: RoutedAhead | None


def _one_pass_rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: RopeLayout) -> Tensor:
    return rotate_keys(x, cos, sin, layout)


def _autograd_rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: RopeLayout) -> Tensor:
    return apply_rope(x.float(), cos, sin, layout).to(x.dtype)


CoDAGQALandmarkPerf2 = BoundedCoDAAttention


def config_of(module: BoundedCoDAAttention) -> dict[str, Any]:
    """Everything needed to rebuild ``module`` (recorded in state files)."""
    core = module.core
    return {
        "embed_dim": core.embed_dim,
        "num_heads": core.num_heads,
        "num_kv_heads": core.num_kv_heads,
        "head_dim": core.head_dim,
        "rope_base": core.rope.base,
        "rope_layout": core.rope.layout,
        "bounded": dataclasses.asdict(module.config),
    }
