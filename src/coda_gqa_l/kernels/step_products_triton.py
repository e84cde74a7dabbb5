"""Triton kernel of ``step_products`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _prologue(X, DELTA, NW, cols, col_ok, K, inv_rms, PROLOGUE: tl.constexpr):
    """One stretch of the product's input row, as float32, from the caller's tensors (see the kernel)."""
    if PROLOGUE == 3:  # silu(gate) * up, rounded as kernels.gated_activation rounds it
        gate = tl.load(X + cols, mask=col_ok, other=0.0)
        up = tl.load(X + K + cols, mask=col_ok, other=0.0)
        g32 = gate.to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(up.dtype)
        x = (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)
    else:
        h = tl.load(X + cols, mask=col_ok, other=0.0)
        if PROLOGUE == 2:
            h = (h.to(tl.float32) + tl.load(DELTA + cols, mask=col_ok, other=0.0).to(tl.float32)).to(h.dtype)
        x = h.to(tl.float32)
        if PROLOGUE >= 1:  # transformers' RMSNorm: normalised in float32, rounded, then the gain in the input's dtype
            normed = (x * inv_rms).to(h.dtype).to(tl.float32)
            w = tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = (w * normed).to(h.dtype).to(tl.float32)
    return x


# K and the weight's row stride are specialised (Triton marks them divisible by 16 where they are): its loads are then
# 16-byte vectors; left unspecialised, one program's SmolLM2 product compiled to 96 two-byte loads instead of 12 (PTX
# for sm_90, Triton 3.6)
@triton.jit(do_not_specialize=["N"])
def _step_product_kernel(
    X, DELTA, NW, H_OUT, W, B, Y, N, K, SWN, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid * BLOCK_N, +BLOCK_N)`` of ``Y = W @ x (+ B)`` for one input row ``x`` formed in the prologue:
    ``PROLOGUE`` 0 the row ``X`` itself; 1 ``RMSNorm(X)`` with gain ``NW``; 2 ``RMSNorm(X + DELTA)``, the sum
    (the new residual) also written to ``H_OUT`` by program 0; 3 ``silu(X[:K]) * X[K:2K]``. Each program forms the
    whole input row itself (it is a few KiB, read from L2 by all), so no kernel runs between the residual add, the
    norm or the activation and the product. Accumulated in float32 over ``BLOCK_K``-wide stretches.

    ``PDL`` (a programmatic dependent launch): the first stretch of weights is loaded before waiting for the kernel
    before (nothing writes weights), so that load overlaps its end; everything else after the wait."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * SWN
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    w_first = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    inv_rms = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        total = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            h = tl.load(X + cols, mask=col_ok, other=0.0)
            if PROLOGUE == 2:
                h = (h.to(tl.float32) + tl.load(DELTA + cols, mask=col_ok, other=0.0).to(tl.float32)).to(h.dtype)
                if pid == 0:
                    tl.store(H_OUT + cols, h, mask=col_ok)
            x = h.to(tl.float32)
            total += x * x
        inv_rms = tl.math.rsqrt(tl.sum(total, axis=0) / K + eps)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    acc = w_first.to(tl.float32) * _prologue(X, DELTA, NW, cols, col_ok, K, inv_rms, PROLOGUE)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = _prologue(X, DELTA, NW, cols, col_ok, K, inv_rms, PROLOGUE)
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def _merged_stream(PM, PL, PACC, at, s, d, ok_hs, BLOCK_D: tl.constexpr):
    """One stream's attention output for a block of heads ``(BLOCK_H, BLOCK_D)`` from its splits' partial softmaxes
    (base 2; ``at`` the partials' ``(BLOCK_H, BLOCK_S)`` offsets), as ``_merge_splits`` of the combine kernel."""
    m = tl.load(PM + at, mask=ok_hs, other=-1.0e30)
    total = tl.load(PL + at, mask=ok_hs, other=0.0)
    acc = tl.load(PACC + at[:, :, None] * BLOCK_D + d[None, None, :], mask=ok_hs[:, :, None], other=0.0)
    weight = tl.exp2(m - tl.max(m, 1)[:, None])
    total = tl.sum(total * weight, 1)
    total = tl.where(total == 0.0, 1.0, total)
    return tl.sum(acc * weight[:, :, None], 1) / total[:, None]


@triton.jit
def _merged_heads(
    PM, PL, PACC, LAM, NW, Y, h0, SPLITS, NUM_HEADS, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
    DIFF: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """Heads ``[h0, h0 + BLOCK_H)`` of the attention output row, ``(BLOCK_H, BLOCK_D)`` float32: the combine kernel's
    ``signal - lambda * noise`` and head norm, rounded to ``Y``'s dtype as it writes them."""
    heads = h0 + tl.arange(0, BLOCK_H)
    h_ok = heads < NUM_HEADS
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    ok_hs = h_ok[:, None] & (s < SPLITS)[None, :]
    row = heads.to(tl.int64) * 2  # partials laid out (H, 2 streams, SPLITS[, BLOCK_D]) for the one batch row
    out = _merged_stream(PM, PL, PACC, row[:, None] * SPLITS + s[None, :], s, d, ok_hs, BLOCK_D)
    if DIFF:
        lam = tl.load(LAM + heads, mask=h_ok, other=0.0)
        noise = _merged_stream(PM, PL, PACC, (row + 1)[:, None] * SPLITS + s[None, :], s, d, ok_hs, BLOCK_D)
        out = out - lam[:, None] * noise
    d_ok = d < HEAD_DIM
    if NORM:
        mean_sq = tl.sum(tl.where(d_ok[None, :], out * out, 0.0), 1) / HEAD_DIM
        w = tl.load(NW + heads[:, None] * HEAD_DIM + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        out = out * tl.rsqrt(mean_sq + eps)[:, None] * w.to(tl.float32)
    out = tl.where(h_ok[:, None] & d_ok[None, :], out, 0.0)
    return out.to(Y.dtype.element_ty).to(tl.float32)


@triton.jit(do_not_specialize=["N", "SPLITS"])
def _merged_product_kernel(
    PM, PL, PACC, LAM, NW, W, B, Y, N, SPLITS, NUM_HEADS, SWN, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, DIFF: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid * BLOCK_N, +BLOCK_N)`` of ``Y = W @ x (+ B)`` where ``x`` is one token's attention output,
    merged from its split partials by every program (``_merged_heads``), ``BLOCK_H`` heads at a time: column
    ``h * HEAD_DIM + d`` of ``W`` meets head ``h``'s dimension ``d``. With ``PDL`` the first heads' weights are loaded
    before waiting for the split attention kernel."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    hb = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    w_rows = W + rows.to(tl.int64)[:, None, None] * SWN
    cols = (hb[:, None] * HEAD_DIM + d[None, :])[None, :, :]
    ok = row_ok[:, None, None] & ((hb[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM))[None, :, :]
    w = tl.load(w_rows + cols, mask=ok, other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    x = _merged_heads(
        PM, PL, PACC, LAM, NW, Y, 0, SPLITS, NUM_HEADS, eps, HEAD_DIM, BLOCK_D, BLOCK_S, BLOCK_H, DIFF, NORM
    )
    acc = tl.sum(tl.sum(w.to(tl.float32) * x[None, :, :], 2), 1)
    for h0 in range(BLOCK_H, NUM_HEADS, BLOCK_H):
        heads = h0 + hb
        cols = (heads[:, None] * HEAD_DIM + d[None, :])[None, :, :]
        ok = row_ok[:, None, None] & ((heads[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM))[None, :, :]
        w = tl.load(w_rows + cols, mask=ok, other=0.0)
        x = _merged_heads(
            PM, PL, PACC, LAM, NW, Y, h0, SPLITS, NUM_HEADS, eps, HEAD_DIM, BLOCK_D, BLOCK_S, BLOCK_H, DIFF, NORM
        )
        acc += tl.sum(tl.sum(w.to(tl.float32) * x[None, :, :], 2), 1)
    if HAS_BIAS:
        acc += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, acc.to(Y.dtype.element_ty), mask=row_ok)
