"""A chunk's window traffic in one pass (the graph-read prefill and the segment-starting steps, ``decode.py``).

Before its attention and routing a bounded layer extends the chunk with the window it follows: the ring's ``W`` rows
in token order, then the chunk's ``n`` rows (keys, values and write gates: ``ext_k``/``ext_v``/``ext_g``). After them
it writes the chunk's last ``min(n, W)`` tokens into the ring. As PyTorch operations that is three gathers, three
concatenations and three index copies per layer (``extend_window_reference``); ``extend_window`` is one Triton launch.
Both read the position on the device only, so a captured chunk replays at any position.

The ring may be written in the same pass because the extension is a copy: the program that copies ring slot ``s``
into the extension is the one that then writes the chunk token bound for ``s`` (at most one token is), so no slot is
written before it is read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import launch, tile_size, use_triton

_ROWS = 32  # extension rows a program copies


def ring_order(pos: Tensor, window: int, window_offsets: Tensor) -> Tensor:
    """The ring slots of the ``window`` tokens before ``pos``, oldest first."""
    return (pos - window + window_offsets) % window


def extend_window_reference(
    ring_k: Tensor, ring_v: Tensor, ring_g: Tensor, pos: Tensor, k: Tensor, v: Tensor, g: Tensor, window_offsets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``ext_k``/``ext_v`` ``(B, Hkv, W + n, Dh)`` in the ring's dtype and ``ext_g (B, Hkv, W + n)``: the window
    before ``pos`` in token order, then the chunk ``k``, ``v`` ``(B, Hkv, n, Dh)`` and ``g (B, Hkv, n)``; then, in
    place, the chunk's last ``min(n, W)`` tokens into their ring slots ``(pos + j) % W``."""
    W, n = ring_k.shape[2], k.shape[2]
    ring = ring_order(pos, W, window_offsets)
    ext_k = torch.cat([ring_k.index_select(2, ring), k.to(ring_k.dtype)], dim=2)
    ext_v = torch.cat([ring_v.index_select(2, ring), v.to(ring_v.dtype)], dim=2)
    ext_g = torch.cat([ring_g.index_select(2, ring), g.to(ring_g.dtype)], dim=2)
    kept = min(n, W)
    slots = (pos + (n - kept) + window_offsets[:kept]) % W
    ring_k.index_copy_(2, slots, k[:, :, n - kept :].to(ring_k.dtype))
    ring_v.index_copy_(2, slots, v[:, :, n - kept :].to(ring_v.dtype))
    ring_g.index_copy_(2, slots, g[:, :, n - kept :].to(ring_g.dtype))
    return ext_k, ext_v, ext_g


def extend_window(
    ring_k: Tensor, ring_v: Tensor, ring_g: Tensor, pos: Tensor, k: Tensor, v: Tensor, g: Tensor, window_offsets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``extend_window_reference`` in one Triton launch on the Triton backend (the ring tensors contiguous; the
    chunk's may be strided views with unit last stride, as a fused product's split leaves them)."""
    B, Hkv, W, D = ring_k.shape
    n = k.shape[2]
    if k.shape != (B, Hkv, n, D) or v.shape != k.shape or g.shape != (B, Hkv, n):
        raise ValueError(f"chunk k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)} for a ring {ring_k.shape}")
    if ring_v.shape != ring_k.shape or ring_g.shape != (B, Hkv, W) or window_offsets.shape != (W,):
        raise ValueError("ring_v, ring_g and window_offsets must match ring_k's (B, Hkv, W, Dh)")
    if not use_triton(k.device) or torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        return extend_window_reference(ring_k, ring_v, ring_g, pos, k, v, g, window_offsets)
    for name, t in (("ring_k", ring_k), ("ring_v", ring_v), ("ring_g", ring_g)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")
    from .window_chunk_triton import _extend_window_kernel

    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    ext_k = torch.empty(B, Hkv, W + n, D, dtype=ring_k.dtype, device=k.device)
    ext_v = torch.empty_like(ext_k)
    ext_g = torch.empty(B, Hkv, W + n, dtype=ring_g.dtype, device=k.device)
    launch(_extend_window_kernel, (B * Hkv, -(-(W + n) // _ROWS)),
        ring_k, ring_v, ring_g, pos, k, v, g, ext_k, ext_v, ext_g,
        Hkv, W, n, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        HEAD_DIM=D, BLOCK_D=tile_size(D, least=2), ROWS=_ROWS, num_warps=2,
    )  # fmt: skip
    return ext_k, ext_v, ext_g
