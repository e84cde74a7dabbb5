"""Triton kernels of ``combine.differential_combine`` (imported only when they run).

One program handles ``BLOCK_R`` (batch, position) rows of one head, so the head's norm gain is
loaded once and its gradient is summed in registers before one atomic add per program.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine_fwd_kernel(
    A, LAM, W, OUT, RSTD,
    sab, sakv, sas, sal,
    slb, slh, sll,
    ROWS, L, NUM_HEADS, GROUP, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # index over (batch, position)
    d = tl.arange(0, BLOCK_D)
    live = rows < ROWS
    ok = live[:, None] & (d < HEAD_DIM)[None, :]
    b = (rows // L).to(tl.int64)
    pos = (rows % L).to(tl.int64)
    head = A + b[:, None] * sab + (h // GROUP) * sakv + pos[:, None] * sal + d[None, :]
    signal = tl.load(head + (h % GROUP) * sas, mask=ok, other=0.0).to(tl.float32)
    noise = tl.load(head + (GROUP + h % GROUP) * sas, mask=ok, other=0.0).to(tl.float32)
    lam = tl.load(LAM + b * slb + h * slh + pos * sll, mask=live, other=0.0).to(tl.float32)
    y = signal - lam[:, None] * noise
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / HEAD_DIM + eps)
        tl.store(RSTD + h * ROWS + rows, rstd, mask=live)
        gain = tl.load(W + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        y = y * rstd[:, None] * gain[None, :]
    # (B, L, H, Dh) contiguous: o_proj's input without a transpose
    out = OUT + (rows.to(tl.int64)[:, None] * NUM_HEADS + h) * HEAD_DIM + d[None, :]
    tl.store(out, y.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _combine_bwd_kernel(
    A, LAM, W, RSTD, DOUT, DA, DLAM, DW,
    sab, sakv, sas, sal,
    slb, slh, sll,
    ROWS, L, NUM_HEADS, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    live = rows < ROWS
    ok = live[:, None] & (d < HEAD_DIM)[None, :]
    b = (rows // L).to(tl.int64)
    pos = (rows % L).to(tl.int64)
    offset = b[:, None] * sab + (h // GROUP) * sakv + pos[:, None] * sal + d[None, :]
    noise = tl.load(A + offset + (GROUP + h % GROUP) * sas, mask=ok, other=0.0).to(tl.float32)
    lam = tl.load(LAM + b * slb + h * slh + pos * sll, mask=live, other=0.0).to(tl.float32)
    dout = DOUT + (rows.to(tl.int64)[:, None] * NUM_HEADS + h) * HEAD_DIM + d[None, :]
    grad = tl.load(dout, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        signal = tl.load(A + offset + (h % GROUP) * sas, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + h * ROWS + rows, mask=live, other=0.0)
        normed = (signal - lam[:, None] * noise) * rstd[:, None]
        gain = tl.load(W + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        tl.atomic_add(DW + h * HEAD_DIM + d, tl.sum(grad * normed, axis=0), mask=d < HEAD_DIM)
        grad = grad * gain[None, :]
        # d/dy of y * rstd(y): rstd * (g - normed * mean(g * normed))
        grad = rstd[:, None] * (grad - normed * (tl.sum(grad * normed, axis=1) / HEAD_DIM)[:, None])
    # DA is contiguous (B, Hkv, 2G, L, Dh) and DLAM contiguous (B, H, L)
    group_start = (b[:, None] * (NUM_HEADS // GROUP) + h // GROUP) * 2 * GROUP  # stream 0 of this KV head
    da = DA + (group_start * L + pos[:, None]) * HEAD_DIM + d[None, :]
    tl.store(da + (h % GROUP) * L * HEAD_DIM, grad.to(DA.dtype.element_ty), mask=ok)
    tl.store(da + (GROUP + h % GROUP) * L * HEAD_DIM, (-lam[:, None] * grad).to(DA.dtype.element_ty), mask=ok)
    tl.store(DLAM + (b * NUM_HEADS + h) * L + pos, -tl.sum(grad * noise, axis=1), mask=live)
