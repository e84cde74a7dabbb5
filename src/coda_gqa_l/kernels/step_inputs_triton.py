"""Triton kernel of ``step_inputs.step_inputs`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .rope_triton import _pair_partner


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _step_inputs_kernel(
    FUSED, COS, SIN, TCOS, TSIN, POS, STACKED, LAM,
    RING_K, RING_V, RING_G, POSITION, BUF_K, BUF_V,
    s_fused_b, s_stacked_b, s_stacked_kv, s_stacked_s,
    NUM_HEADS, NUM_KV, WINDOW, SEG,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, NOISE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (batch row, query head): the head's rotated signal (and noise) query and its lambda; the
    group's first head also writes its KV head's token into the window (ring and segment buffer)."""
    if PDL:  # a programmatic dependent launch: the kernel before has finished and its writes are visible past here
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    b = (pid // NUM_HEADS).to(tl.int64)
    h = pid % NUM_HEADS
    group = NUM_HEADS // NUM_KV
    kvh = h // group
    g = h % group
    width_q = NUM_HEADS * HEAD_DIM
    width_kv = NUM_KV * HEAD_DIM
    row = FUSED + b * s_fused_b
    d = tl.arange(0, BLOCK_D)
    ok = d < HEAD_DIM
    partner, sign = _pair_partner(d, HEAD_DIM, HALF)
    cos = tl.load(COS + d, mask=ok, other=0.0)
    sin = tl.load(SIN + d, mask=ok, other=0.0)
    # the query: the same arithmetic as rope_triton._rotate_kernel (x * cos + partner * sign * sin, float32)
    x = tl.load(row + h * HEAD_DIM + d, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(row + h * HEAD_DIM + partner, mask=ok, other=0.0).to(tl.float32) * sign
    out = STACKED + b * s_stacked_b + kvh * s_stacked_kv + d
    tl.store(out + g * s_stacked_s, (x * cos + xp * sin).to(STACKED.dtype.element_ty), mask=ok)
    if NOISE:  # RoPE's angle plus the head's learned noise angle, as rope_triton._noise_angles
        tcos = tl.load(TCOS + h * HEAD_DIM + d, mask=ok, other=1.0)
        tsin = tl.load(TSIN + h * HEAD_DIM + d, mask=ok, other=0.0)
        ncos = cos * tcos - sin * tsin
        nsin = sin * tcos + cos * tsin
        tl.store(out + (group + g) * s_stacked_s, (x * ncos + xp * nsin).to(STACKED.dtype.element_ty), mask=ok)
    logits = row + width_q + 2 * width_kv
    tl.store(LAM + b * NUM_HEADS + h, _sigmoid(tl.load(logits + h).to(tl.float32)))
    if g == 0:  # the window step of kernels/window_step_triton.py, for this KV head
        pos = tl.load(POS)
        slot = pos % WINDOW
        at = WINDOW - SEG + pos % SEG
        kv_row = b * NUM_KV + kvh  # (b, kv head) rows of the contiguous (B, Hkv, ...) targets
        k = tl.load(row + width_q + kvh * HEAD_DIM + d, mask=ok, other=0.0)
        v = tl.load(row + width_q + width_kv + kvh * HEAD_DIM + d, mask=ok, other=0.0)
        gate = _sigmoid(tl.load(logits + NUM_HEADS + kvh).to(tl.float32))
        tl.store(RING_K + (kv_row * WINDOW + slot) * HEAD_DIM + d, k.to(RING_K.dtype.element_ty), mask=ok)
        tl.store(RING_V + (kv_row * WINDOW + slot) * HEAD_DIM + d, v.to(RING_V.dtype.element_ty), mask=ok)
        tl.store(RING_G + kv_row * WINDOW + slot, gate.to(RING_G.dtype.element_ty))
        kp = tl.load(row + width_q + kvh * HEAD_DIM + partner, mask=ok, other=0.0).to(tl.float32) * sign
        key = k.to(tl.float32) * cos + kp * sin
        tl.store(BUF_K + (kv_row * WINDOW + at) * HEAD_DIM + d, key.to(BUF_K.dtype.element_ty), mask=ok)
        tl.store(BUF_V + (kv_row * WINDOW + at) * HEAD_DIM + d, v.to(BUF_V.dtype.element_ty), mask=ok)
        if h == 0:
            tl.store(POSITION + b, tl.load(POSITION + b) + 1)
