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
