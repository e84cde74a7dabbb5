"""Triton kernel of ``window_step.write_window_step`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl

from .rope_triton import _pair_partner


@triton.jit
def _window_step_kernel(
    K, V, G, COS, SIN, POS, RING_K, RING_V, RING_G, POSITION, BUF_K, BUF_V,
    NUM_KV, WINDOW, SEG,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTATE: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """One program per (batch row, KV head): its token into the ring slot and the segment buffer's slot."""
    pid = tl.program_id(0)
    b = (pid // NUM_KV).to(tl.int64)
    pos = tl.load(POS)
    slot = pos % WINDOW
    at = WINDOW - SEG + pos % SEG
    d = tl.arange(0, BLOCK_D)
    ok = d < HEAD_DIM
    row = pid.to(tl.int64)  # (b, kv head) rows of the contiguous (B, Hkv, ...) tensors
    k = tl.load(K + row * HEAD_DIM + d, mask=ok, other=0.0)
    v = tl.load(V + row * HEAD_DIM + d, mask=ok, other=0.0)
    tl.store(RING_K + (row * WINDOW + slot) * HEAD_DIM + d, k.to(RING_K.dtype.element_ty), mask=ok)
    tl.store(RING_V + (row * WINDOW + slot) * HEAD_DIM + d, v.to(RING_V.dtype.element_ty), mask=ok)
    tl.store(RING_G + row * WINDOW + slot, tl.load(G + row).to(RING_G.dtype.element_ty))
    if ROTATE:  # the same arithmetic as rope_triton._rotate_kernel: x * cos + partner * sign * sin in float32
        partner, sign = _pair_partner(d, HEAD_DIM, HALF)
        x = k.to(tl.float32)
        xp = tl.load(K + row * HEAD_DIM + partner, mask=ok, other=0.0).to(tl.float32) * sign
        cos = tl.load(COS + d, mask=ok, other=0.0)
        sin = tl.load(SIN + d, mask=ok, other=0.0)
        key = x * cos + xp * sin
    else:
        key = k
    tl.store(BUF_K + (row * WINDOW + at) * HEAD_DIM + d, key.to(BUF_K.dtype.element_ty), mask=ok)
    tl.store(BUF_V + (row * WINDOW + at) * HEAD_DIM + d, v.to(BUF_V.dtype.element_ty), mask=ok)
    if pid % NUM_KV == 0:
        tl.store(POSITION + b, tl.load(POSITION + b) + 1)
