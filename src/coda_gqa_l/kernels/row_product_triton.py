"""Triton kernel of ``row_product`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "K"])
def _row_product_kernel(
    X, W, B, Y, N, K, SWN, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid * BLOCK_N, +BLOCK_N)`` of ``Y = W @ x (+ B)`` for one input row, accumulated in float32 over
    ``BLOCK_K``-wide stretches of the row. With ``SILU_MUL`` the row is ``silu(X[:K]) * X[K:2K]``, computed as it
    is loaded and rounded as ``silu_and_mul`` rounds it (each product to the input's dtype)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * SWN
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        if SILU_MUL:
            gate = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
            up = tl.load(X + K + cols, mask=col_ok, other=0.0)
            silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
            x = (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)
        else:
            x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)
