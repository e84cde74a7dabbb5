"""Triton kernel of ``rope.stack_rotated_queries`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pair_partner(d, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """Each dimension's partner in its rotation pair, and the sign of the partner's term in the
    90-degree turn ``(a, b) -> (-b, a)``: halves (``HALF``) or neighbours (interleaved)."""
    if HALF:
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
    else:
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    return partner, sign


@triton.jit
def _row_tile(L, NUM_HEADS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's batch row, head, ``BLOCK_L`` token rows, dimensions and in-bounds mask
    (grid: token blocks x batch * heads)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = pid_bh % NUM_HEADS
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    ok = (rows < L)[:, None] & (d < HEAD_DIM)[None, :]
    return b, h, rows, d, ok


@triton.jit
def _noise_angles(TCOS, TSIN, h, d, cos, sin, HEAD_DIM: tl.constexpr):
    """cos and sin of RoPE's angle plus head ``h``'s learned noise angle: cos(a + b), sin(a + b)."""
    tcos = tl.load(TCOS + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=1.0)[None, :]
    tsin = tl.load(TSIN + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)[None, :]
    return cos * tcos - sin * tsin, sin * tcos + cos * tsin


@triton.jit(do_not_specialize=["L"])  # one binary for every chunk length, the one-token step's too
def _rotate_kernel(
    X, COS, SIN, TCOS, TSIN, OUT,
    sxb, sxh, sxl,
    sob, sokv, sos, sol,
    L, NUM_HEADS, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HALF: tl.constexpr, NOISE: tl.constexpr,
):  # fmt: skip
    b, h, rows, d, ok = _row_tile(L, NUM_HEADS, HEAD_DIM, BLOCK_D, BLOCK_L)
    partner, sign = _pair_partner(d, HEAD_DIM, HALF)
    base = X + b * sxb + h * sxh + rows[:, None] * sxl
    x = tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=ok, other=0.0).to(tl.float32) * sign[None, :]
    cos = tl.load(COS + rows[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
    sin = tl.load(SIN + rows[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
    kvh = h // GROUP
    out = OUT + b * sob + kvh * sokv + rows[:, None] * sol + d[None, :]
    tl.store(out + (h % GROUP) * sos, (x * cos + xp * sin).to(OUT.dtype.element_ty), mask=ok)
    if NOISE:
        ncos, nsin = _noise_angles(TCOS, TSIN, h, d, cos, sin, HEAD_DIM)
        tl.store(out + (GROUP + h % GROUP) * sos, (x * ncos + xp * nsin).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rotate_bwd_kernel(
    G, X, COS, SIN, TCOS, TSIN, DX, DT,
    sgb, sgkv, sgs, sgl,
    sxb, sxh, sxl,
    L, NUM_HEADS, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HALF: tl.constexpr, NOISE: tl.constexpr,
):  # fmt: skip
    """Gradient of ``_rotate_kernel``: each stream's rotation transposed (turned back by its
    angle) and summed into ``DX (B, H, L, Dh)`` contiguous; with ``NOISE``, the per-dimension
    partial sums of d loss / d angle over this program's rows added into ``DT (H, Dh)``."""
    b, h, rows, d, ok = _row_tile(L, NUM_HEADS, HEAD_DIM, BLOCK_D, BLOCK_L)
    partner, sign = _pair_partner(d, HEAD_DIM, HALF)
    cos = tl.load(COS + rows[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
    sin = tl.load(SIN + rows[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
    grads = G + b * sgb + (h // GROUP) * sgkv + rows[:, None] * sgl
    signal = grads + (h % GROUP) * sgs
    g = tl.load(signal + d[None, :], mask=ok, other=0.0).to(tl.float32)
    gp = tl.load(signal + partner[None, :], mask=ok, other=0.0).to(tl.float32) * sign[None, :]
    dx = g * cos - gp * sin
    if NOISE:
        ncos, nsin = _noise_angles(TCOS, TSIN, h, d, cos, sin, HEAD_DIM)
        noise = grads + (GROUP + h % GROUP) * sgs
        gn = tl.load(noise + d[None, :], mask=ok, other=0.0).to(tl.float32)
        gnp = tl.load(noise + partner[None, :], mask=ok, other=0.0).to(tl.float32) * sign[None, :]
        dx += gn * ncos - gnp * nsin
        # d out / d angle = x * (-nsin) + xp * ncos; both dimensions of a pair share the angle
        source = X + b * sxb + h * sxh + rows[:, None] * sxl
        x = tl.load(source + d[None, :], mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(source + partner[None, :], mask=ok, other=0.0).to(tl.float32) * sign[None, :]
        tl.atomic_add(DT + h * HEAD_DIM + d, tl.sum(gn * (xp * ncos - x * nsin), axis=0), mask=d < HEAD_DIM)
    out = DX + (b * NUM_HEADS + h) * L * HEAD_DIM + rows[:, None] * HEAD_DIM + d[None, :]
    tl.store(out, dx.to(DX.dtype.element_ty), mask=ok)
