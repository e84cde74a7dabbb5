"""Triton kernel of ``rope.stack_rotated_queries`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate_kernel(
    X, COS, SIN, TCOS, TSIN, OUT,
    sxb, sxh, sxl,
    sob, sokv, sos, sol,
    L, NUM_HEADS, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HALF: tl.constexpr, NOISE: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = pid_bh % NUM_HEADS
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    if HALF:
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
    else:
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    ok = (rows < L)[:, None] & (d < HEAD_DIM)[None, :]
    base = X + b * sxb + h * sxh + rows[:, None] * sxl
    x = tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=ok, other=0.0).to(tl.float32) * sign[None, :]
    cos = tl.load(COS + rows[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
    sin = tl.load(SIN + rows[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
    kvh = h // GROUP
    out = OUT + b * sob + kvh * sokv + rows[:, None] * sol + d[None, :]
    tl.store(out + (h % GROUP) * sos, (x * cos + xp * sin).to(OUT.dtype.element_ty), mask=ok)
    if NOISE:
        tcos = tl.load(TCOS + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=1.0)[None, :]
        tsin = tl.load(TSIN + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)[None, :]
        ncos = cos * tcos - sin * tsin  # cos(a + b)
        nsin = sin * tcos + cos * tsin  # sin(a + b)
        tl.store(out + (GROUP + h % GROUP) * sos, (x * ncos + xp * nsin).to(OUT.dtype.element_ty), mask=ok)
