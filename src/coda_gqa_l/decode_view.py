"""The reference path's one-token step, with the keys a segment's queries see built once per segment.

``attend_segments`` (the reference) rebuilds, for every token it scores, the segment's key block:
the window's ``W`` keys gathered from the ring and rotated, the sinks rotated, the banks' view and
the masks. Within one segment none of that changes except that each new token adds its own key:
in ``relative`` position mode a window key's position is its column in the segment's block, not
its distance to the query (segment_attention.py). A ``DecodeView`` holds that block for the
current segment, float32 and already rotated, and a step writes only its own column, so a CPU
decode step does a few operations per layer instead of about a hundred.

The view is derived data, never saved: the state file keeps its pre-RoPE keys (docs/semantics.md section 4). It is
valid only for the state tensors it was built from, at the token it expects next; any other
change to the state (a prefill, a clone, a loaded file, an in-place write outside inference mode)
makes the next step rebuild it. The outputs are the reference's to the last bit: the same float32 rotations, the same
key order and masks, the same einsum (tests/test_decode_view.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import BoundedConfig
from .kernels.routing_reference import bank_view
from .primitives import RotaryEmbedding, apply_rope
from .state import BANK_FIELDS, Banks, BoundedState

_WATCHED = ("sink_k", "sink_v", "win_k", "win_v", "win_g", *("ex_k", "ex_v", "ex_g", "ex_filled"),
            *("sm_k", "sm_v", "sm_g", "sm_filled"))  # fmt: skip


def _fingerprint(tensors: Mapping[str, Tensor]) -> tuple[tuple[int, int], ...]:
    # the tensor objects and their in-place version counters: a new tensor or an in-place write to
    # one the view was built from changes this. Tensors made under torch.inference_mode keep no
    # counter; only the CUDA-graph decoder writes a state in place, and it runs the fused path.
    return tuple((id(t), -1 if t.is_inference() else t._version) for t in (tensors[n] for n in _WATCHED))


def _watched(state: BoundedState) -> dict[str, Tensor]:
    return {name: getattr(state, name) for name in _WATCHED}


@dataclass
class DecodeView:
    """Keys, values and logit offsets one segment's queries see: sinks, window columns, bank slots.

    ``keys``/``values``: ``(B, Hkv, Ns + W + M, Dh)`` float32, keys rotated as the reference
    rotates them; ``bias``: ``(B, Hkv, Ns + W + M)`` float32, ``-inf`` for columns not visible
    (not arrived yet, before the stream or a sink's slot, empty bank slots), else the bank's
    ``log g`` or 0. ``next_token`` is the token the view expects next.
    """

    segment: int
    next_token: int
    keys: Tensor
    values: Tensor
    bias: Tensor
    fingerprint: tuple[tuple[int, int], ...]
    held: tuple[Tensor, ...]  # the watched tensors themselves, so that their ids are not reused


def applies(config: BoundedConfig, start: int) -> bool:
    """Whether a one-token step at ``start`` can use a view: relative positions, sinks all written."""
    return config.position_mode == "relative" and start >= config.num_sink


def view_for(state: BoundedState, config: BoundedConfig, rope: RotaryEmbedding) -> DecodeView:
    """The state's view for its next token, rebuilt when missing or stale."""
    view = state.decode_view
    t, S = state.pos, config.segment
    if (
        isinstance(view, DecodeView)
        and view.next_token == t
        and view.segment == t // S
        and view.fingerprint == _fingerprint(_watched(state))
    ):
        return view
    view = _build(state, config, rope)
    state.decode_view = view
    return view


def _build(state: BoundedState, config: BoundedConfig, rope: RotaryEmbedding) -> DecodeView:
    """The block of segment ``t // S`` as it stands before token ``t`` (the banks already routed)."""
    W, S, Ns = config.window, config.segment, config.num_sink
    t = state.pos
    b = t // S * S
    device = state.win_k.device
    c = torch.arange(W, device=device)
    token = b - W + S + c  # the token of each window column
    arrived = (token < t) & (token >= max(Ns, 0))  # the ring holds tokens t - W .. t - 1
    slots = token.clamp(min=0) % W
    win_k = state.win_k.index_select(2, slots).float()
    win_v = state.win_v.index_select(2, slots).float()
    cos, sin = rope.cos_sin(S + c, torch.float32)
    win_k = apply_rope(win_k, cos, sin, rope.layout)
    keep = arrived[:, None].to(win_k.dtype)
    win_k, win_v = win_k * keep, win_v * keep  # columns not arrived hold zeros, as the reference pads

    i = torch.arange(Ns, device=device)
    cos, sin = rope.cos_sin(torch.maximum(i - b + W, i - Ns), torch.float32)
    sinks_k = apply_rope(state.sink_k.float(), cos, sin, rope.layout)
    bank_k, bank_v, bank_bias = bank_view(Banks(*(getattr(state, name) for name in BANK_FIELDS)))
    B, Hkv = state.win_k.shape[:2]
    # every sink is visible: the reference's i <= t holds once t >= Ns (``applies``)
    structural = torch.zeros(Ns + W, device=device).masked_fill(~torch.cat([i >= 0, arrived]), float("-inf"))
    return DecodeView(
        segment=t // S,
        next_token=t,
        keys=torch.cat([sinks_k, win_k, bank_k.float()], dim=2),
        values=torch.cat([state.sink_v.float(), win_v, bank_v.float()], dim=2),
        bias=torch.cat([structural.expand(B, Hkv, Ns + W), bank_bias.float()], dim=-1).contiguous(),
        fingerprint=_fingerprint(_watched(state)),
        held=tuple(_watched(state).values()),
    )


def attend_step(
    view: DecodeView, q: Tensor, k: Tensor, v: Tensor, *, config: BoundedConfig, rope: RotaryEmbedding, scale: float
) -> Tensor:
    """Token ``view.next_token``: adds its key and value to the view, returns its attention output.

    ``q``: ``(B, Hkv, Q, 1, Dh)`` stacked queries before RoPE; ``k``, ``v``: ``(B, Hkv, 1, Dh)``
    as projected (pre-RoPE). Returns ``(B, Hkv, Q, 1, Dh)`` in the dtype of ``q``.
    """
    W, S, Ns = config.window, config.segment, config.num_sink
    r = view.next_token - view.segment * S
    column = Ns + W - S + r  # the token's own window column (segment_attention: c = W - S + r)
    cos, sin = rope.cos_sin(torch.tensor([W + r], device=q.device), torch.float32)
    view.keys[:, :, column] = apply_rope(k.float(), cos, sin, rope.layout)[:, :, 0]
    view.values[:, :, column] = v.float()[:, :, 0]
    view.bias[:, :, column] = 0.0
    qr = apply_rope(q.float(), cos, sin, rope.layout).mul_(scale)  # scaled as segment_attention scales it
    scores = torch.einsum("bhqsd,bhkd->bhqsk", qr, view.keys)
    probs = torch.softmax(scores + view.bias[:, :, None, None, :], dim=-1)
    view.next_token += 1
    return torch.einsum("bhqsk,bhkd->bhqsd", probs, view.values).to(q.dtype)


def follow(view: DecodeView, state: BoundedState, fields: Mapping[str, object]) -> None:
    """The step's new state fields (``fields``, not yet set on ``state``): the view follows them."""
    tensors = {name: fields.get(name, getattr(state, name)) for name in _WATCHED}
    view.fingerprint = _fingerprint(tensors)  # type: ignore[arg-type]
    view.held = tuple(tensors.values())  # type: ignore[arg-type]
