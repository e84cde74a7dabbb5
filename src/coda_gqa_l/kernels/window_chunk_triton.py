"""Triton kernel of ``window_chunk.extend_window`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N"])
def _extend_window_kernel(
    RING_K, RING_V, RING_G, POS, K, V, G, EXT_K, EXT_V, EXT_G,
    NUM_KV, WINDOW, N,
    SKB, SKH, SKT, SVB, SVH, SVT, SGB, SGH, SGT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Program ``(b * Hkv + h, block)``: ``ROWS`` rows of the extension. A row ``i < W`` is ring slot
    ``(pos - W + i) % W``, whose chunk token (if any) this program then writes; a row ``i >= W`` is chunk token
    ``i - W``."""
    pid = tl.program_id(0)
    b = (pid // NUM_KV).to(tl.int64)
    h = (pid % NUM_KV).to(tl.int64)
    row = pid.to(tl.int64)  # (b, kv head) row of the contiguous (B, Hkv, ...) ring and extension
    pos = tl.load(POS).to(tl.int64)
    i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    total = WINDOW + N
    in_ring = i < WINDOW
    in_chunk = (i >= WINDOW) & (i < total)
    slot = (pos + i) % WINDOW  # (pos - W + i) mod W, kept non-negative (Triton's % keeps the dividend's sign)
    t = tl.maximum(i - WINDOW, 0)  # the chunk token of an extension row past the window
    ring_at = (row * WINDOW + slot)[:, None] * HEAD_DIM + d[None, :]
    k_at = b * SKB + h * SKH + t[:, None] * SKT + d[None, :]
    v_at = b * SVB + h * SVH + t[:, None] * SVT + d[None, :]
    ring_ok = in_ring[:, None] & d_ok[None, :]
    chunk_ok = in_chunk[:, None] & d_ok[None, :]
    dtype = EXT_K.dtype.element_ty
    k = tl.where(ring_ok, tl.load(RING_K + ring_at, mask=ring_ok, other=0.0),
                 tl.load(K + k_at, mask=chunk_ok, other=0.0).to(dtype))  # fmt: skip
    v = tl.where(ring_ok, tl.load(RING_V + ring_at, mask=ring_ok, other=0.0),
                 tl.load(V + v_at, mask=chunk_ok, other=0.0).to(dtype))  # fmt: skip
    gate = tl.where(in_ring, tl.load(RING_G + row * WINDOW + slot, mask=in_ring, other=0.0),
                    tl.load(G + b * SGB + h * SGH + t * SGT, mask=in_chunk, other=0.0))  # fmt: skip
    out_ok = (i < total)[:, None] & d_ok[None, :]
    ext_at = (row * total + i)[:, None] * HEAD_DIM + d[None, :]
    tl.store(EXT_K + ext_at, k, mask=out_ok)
    tl.store(EXT_V + ext_at, v, mask=out_ok)
    tl.store(EXT_G + row * total + i, gate.to(EXT_G.dtype.element_ty), mask=i < total)
    tl.debug_barrier()  # every read of these ring slots is done before they are written
    # the chunk token bound for this row's slot: j = n - kept + ((i - (n - kept)) mod W), kept = min(n, W); with
    # n < W only rows i < n have one
    kept = tl.minimum(N, WINDOW)
    first = N - kept
    j = first + ((i - first) % WINDOW + WINDOW) % WINDOW
    writes = in_ring & (j < N)
    w_ok = writes[:, None] & d_ok[None, :]
    nk = tl.load(K + b * SKB + h * SKH + j[:, None] * SKT + d[None, :], mask=w_ok, other=0.0)
    nv = tl.load(V + b * SVB + h * SVH + j[:, None] * SVT + d[None, :], mask=w_ok, other=0.0)
    ng = tl.load(G + b * SGB + h * SGH + j * SGT, mask=writes, other=0.0)
    tl.store(RING_K + ring_at, nk.to(RING_K.dtype.element_ty), mask=w_ok)
    tl.store(RING_V + ring_at, nv.to(RING_V.dtype.element_ty), mask=w_ok)
    tl.store(RING_G + row * WINDOW + slot, ng.to(RING_G.dtype.element_ty), mask=writes)
