"""A graph decoder's one-token step into its window, in one pass (the whole-model graph step, ``decode.py``).

Inside a segment a decode step writes its token into the state's window ring (key before RoPE, value, write gate),
advances the row positions, and puts the token into the segment's window buffer, which the attention kernel reads in
token order (``diff_attention.SEGMENT_WINDOW``): its key rotated at the token's position (relative mode), its value.
As separate operations that is three index copies, a rotation and an add per layer; ``write_window_step`` is one
Triton launch. ``write_window_step_reference`` is the same in PyTorch (the CPU, and what the kernel is tested
against). Both read the position on the device only, so the step can be captured once and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..primitives import RopeLayout, apply_rope
from .dispatch import launch, tile_size, use_triton


@dataclass
class WindowStep:
    """What one step writes: the token's key ``k`` (before RoPE in relative mode, as the state keeps it) and value
    ``v`` ``(B, Hkv, 1, Dh)``, its write gate ``g (B, Hkv, 1)`` float32; ``cos``/``sin`` ``(1, Dh)`` float32 of its
    position (None: store the key in the buffer as it is, the absolute mode's pre-rotated keys)."""

    k: Tensor
    v: Tensor
    g: Tensor
    cos: Tensor | None
    sin: Tensor | None


def _check(step: WindowStep, ring_k: Tensor, buffer_k: Tensor, segment: int) -> None:
    B, Hkv, one, D = step.k.shape
    W = ring_k.shape[2]
    if one != 1 or step.v.shape != step.k.shape or step.g.shape != (B, Hkv, 1):
        raise ValueError(f"a window step writes one token: k, v {tuple(step.k.shape)}, g {tuple(step.g.shape)}")
    if ring_k.shape != (B, Hkv, W, D) or buffer_k.shape != (B, Hkv, W, D):
        raise ValueError(f"ring {tuple(ring_k.shape)} and buffer {tuple(buffer_k.shape)} must be (B, Hkv, W, Dh)")
    if W % segment:
        raise ValueError(f"the window ({W}) must be a multiple of the segment ({segment})")


@dataclass
class WindowTargets:
    """Where a step writes, in place: the state's ring ``ring_k``/``ring_v`` ``(B, Hkv, W, Dh)`` and ``ring_g``
    ``(B, Hkv, W)``, its row positions ``position (B,)``, and the segment's window buffer ``buffer_k``/``buffer_v``
    ``(B, Hkv, W, Dh)`` (``decode.KeptExtras``)."""

    ring_k: Tensor
    ring_v: Tensor
    ring_g: Tensor
    position: Tensor
    buffer_k: Tensor
    buffer_v: Tensor


def write_window_step_reference(
    step: WindowStep, to: WindowTargets, pos: Tensor, segment: int, layout: RopeLayout
) -> None:
    """In place: ring slot ``pos % W`` <- (k, v, g); ``position += 1``; buffer slot ``W - S + pos % S`` <- (k rotated
    at ``pos``, v)."""
    W = to.ring_k.shape[2]
    slot = (pos % W).view(1)
    to.ring_k.index_copy_(2, slot, step.k.to(to.ring_k.dtype))
    to.ring_v.index_copy_(2, slot, step.v.to(to.ring_v.dtype))
    to.ring_g.index_copy_(2, slot, step.g.to(to.ring_g.dtype))
    to.position.add_(1)
    key = step.k
    if step.cos is not None and step.sin is not None:
        key = apply_rope(key.float(), step.cos, step.sin, layout)
    at = (W - segment + pos % segment).view(1)
    to.buffer_k.index_copy_(2, at, key.to(to.buffer_k.dtype))
    to.buffer_v.index_copy_(2, at, step.v.to(to.buffer_v.dtype))


def write_window_step(step: WindowStep, to: WindowTargets, pos: Tensor, segment: int, layout: RopeLayout) -> None:
    """``write_window_step_reference`` in one Triton launch on the Triton backend (every target contiguous)."""
    _check(step, to.ring_k, to.buffer_k, segment)
    if not use_triton(step.k.device):
        write_window_step_reference(step, to, pos, segment, layout)
        return
    from .window_step_triton import _window_step_kernel

    B, Hkv, _, D = step.k.shape
    for name, t in vars(to).items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")
    k, v, g = step.k.contiguous(), step.v.contiguous(), step.g.contiguous()
    rotate = step.cos is not None and step.sin is not None
    cos = step.cos.contiguous() if step.cos is not None else k  # unread without ROTATE
    sin = step.sin.contiguous() if step.sin is not None else k
    launch(_window_step_kernel, (B * Hkv,),
        k, v, g, cos, sin, pos, to.ring_k, to.ring_v, to.ring_g, to.position, to.buffer_k, to.buffer_v,
        Hkv, to.ring_k.shape[2], segment,
        HEAD_DIM=D, BLOCK_D=tile_size(D, least=2), ROTATE=rotate, HALF=layout == "half", num_warps=1,
    )  # fmt: skip
