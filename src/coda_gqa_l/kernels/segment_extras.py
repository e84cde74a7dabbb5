"""What each segment's queries see beside the window, built in one pass (``BoundedCoDAAttention.segment_extras``).

For every segment a chunk touches, the attention reads the sinks and the bank snapshot of that segment, keys rotated
to the segment's positions (relative mode), with their logit offsets (zero for the sinks). As PyTorch operations that
is two rotation kernels (sinks and banks), three concatenations and a zero fill per layer and chunk
(``build_extras_reference``); ``build_extras`` is one Triton launch, rotating as ``rope.rotate_keys`` does (the
same float32 arithmetic, so the results are the reference's bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..primitives import RopeLayout
from .dispatch import launch, tile_size, use_triton
from .rope import rotate_keys

_ROWS = 32  # extra slots a program writes


def build_extras_reference(
    sink_k: Tensor, sink_v: Tensor, bank_k: Tensor, bank_v: Tensor, bank_bias: Tensor, dtype: torch.dtype,
    sink_angles: tuple[Tensor, Tensor] | None, bank_angles: tuple[Tensor, Tensor] | None, layout: RopeLayout,
    rotate: Callable[[Tensor, Tensor, Tensor, RopeLayout], Tensor] = rotate_keys,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``extra_k``/``extra_v`` ``(B, Hkv, nseg, Ns + M, Dh)`` in ``dtype`` and ``extra_bias (B, Hkv, nseg, Ns + M)``:
    per segment the sinks ``sink_* (B, Hkv, Ns, Dh)`` then its bank snapshot ``bank_* (B, Hkv, nseg, M, Dh)``,
    offsets ``bank_bias (B, Hkv, nseg, M)`` (zero for the sinks). Keys rotated where angles are given:
    ``sink_angles`` cos and sin ``(nseg, Ns, Dh)``, ``bank_angles`` ``(nseg, Dh)`` (one position per segment), by
    ``rotate`` (the layer's training path passes one that autograd differentiates)."""
    sink_k, sink_v, bank_k, bank_v = (t.to(dtype) for t in (sink_k, sink_v, bank_k, bank_v))
    B, Hkv, nseg, M, D = bank_k.shape
    Ns = sink_k.shape[2]
    extra_k = bank_k
    if bank_angles is not None and M:
        cos, sin = (a.repeat_interleave(M, dim=0) for a in bank_angles)
        extra_k = rotate(bank_k.reshape(B, Hkv, nseg * M, D), cos, sin, layout).view(bank_k.shape)
    extra_v, extra_bias = bank_v, bank_bias
    if Ns:
        sinks_k = sink_k[:, :, None].expand(B, Hkv, nseg, Ns, D)
        if sink_angles is not None:
            cos, sin = (a.reshape(nseg * Ns, D) for a in sink_angles)
            sinks_k = rotate(sinks_k.reshape(B, Hkv, nseg * Ns, D), cos, sin, layout).view(sinks_k.shape)
        extra_k = torch.cat([sinks_k, extra_k], dim=3)
        extra_v = torch.cat([sink_v[:, :, None].expand(B, Hkv, nseg, Ns, D), extra_v], dim=3)
        extra_bias = torch.cat([bank_bias.new_zeros(B, Hkv, nseg, Ns), extra_bias], dim=3)
    return extra_k, extra_v, extra_bias


def build_extras(
    sink_k: Tensor, sink_v: Tensor, bank_k: Tensor, bank_v: Tensor, bank_bias: Tensor, dtype: torch.dtype,
    sink_angles: tuple[Tensor, Tensor] | None, bank_angles: tuple[Tensor, Tensor] | None, layout: RopeLayout,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``build_extras_reference`` in one Triton launch on the Triton backend (inference: no autograd); sinks and
    banks rotated alike (both angle sets given, or neither)."""
    B, Hkv, nseg, M, D = bank_k.shape
    Ns = sink_k.shape[2]
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (sink_k, sink_v, bank_k, bank_v, bank_bias))
    if not use_triton(bank_k.device) or grads or (sink_angles is None) != (bank_angles is None) or nseg * (Ns + M) == 0:
        return build_extras_reference(
            sink_k, sink_v, bank_k, bank_v, bank_bias, dtype, sink_angles, bank_angles, layout
        )
    from .segment_extras_triton import _segment_extras_kernel

    sink_k, sink_v, bank_k, bank_v, bank_bias = (t.contiguous() for t in (sink_k, sink_v, bank_k, bank_v, bank_bias))
    rotate = sink_angles is not None and bank_angles is not None
    if rotate:
        assert sink_angles is not None and bank_angles is not None  # for mypy: checked above
        scos, ssin, bcos, bsin = (t.contiguous() for t in (*sink_angles, *bank_angles))
    else:
        scos = ssin = bcos = bsin = bank_bias  # unread without ROTATE
    extra_k = torch.empty(B, Hkv, nseg, Ns + M, D, dtype=dtype, device=bank_k.device)
    extra_v = torch.empty_like(extra_k)
    extra_bias = torch.empty(B, Hkv, nseg, Ns + M, dtype=bank_bias.dtype, device=bank_k.device)
    launch(_segment_extras_kernel, (B * Hkv, nseg, -(-(Ns + M) // _ROWS)),
        sink_k, sink_v, bank_k, bank_v, bank_bias, scos, ssin, bcos, bsin, extra_k, extra_v, extra_bias,
        nseg, Ns, M,
        HEAD_DIM=D, BLOCK_D=tile_size(D, least=2), ROWS=_ROWS, ROTATE=rotate, HALF=layout == "half", num_warps=2,
    )  # fmt: skip
    return extra_k, extra_v, extra_bias
