"""Triton kernel of ``segment_extras.build_extras`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl

from .rope_triton import _pair_partner


@triton.jit(do_not_specialize=["NSEG", "NS", "M"])
def _segment_extras_kernel(
    SINK_K, SINK_V, BANK_K, BANK_V, BANK_B, SCOS, SSIN, BCOS, BSIN, OUT_K, OUT_V, OUT_B,
    NSEG, NS, M,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, ROTATE: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Program ``(b * Hkv + h, segment, block)``: ``ROWS`` extra slots of one segment, sinks first."""
    row = tl.program_id(0).to(tl.int64)  # (b, kv head) row of the contiguous (B, Hkv, ...) tensors
    e = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    total = NS + M
    is_sink = r < NS
    is_bank = (r >= NS) & (r < total)
    slot = tl.maximum(r - NS, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    sink_ok = is_sink[:, None] & d_ok[None, :]
    bank_ok = is_bank[:, None] & d_ok[None, :]
    sink_r = tl.maximum(tl.minimum(r, NS - 1), 0)  # in bounds on masked rows too
    sink_at = (row * NS + sink_r)[:, None] * HEAD_DIM
    bank_at = ((row * NSEG + e) * M + slot)[:, None] * HEAD_DIM
    dtype = OUT_K.dtype.element_ty
    x = tl.where(sink_ok, tl.load(SINK_K + sink_at + d[None, :], mask=sink_ok, other=0.0).to(dtype),
                 tl.load(BANK_K + bank_at + d[None, :], mask=bank_ok, other=0.0).to(dtype))  # fmt: skip
    if ROTATE:  # the arithmetic of rope_triton._rotate_kernel: x * cos + partner * sign * sin in float32
        partner, sign = _pair_partner(d, HEAD_DIM, HALF)
        xp = tl.where(sink_ok, tl.load(SINK_K + sink_at + partner[None, :], mask=sink_ok, other=0.0).to(dtype),
                      tl.load(BANK_K + bank_at + partner[None, :], mask=bank_ok, other=0.0).to(dtype))  # fmt: skip
        angle_at = (e * NS + sink_r)[:, None] * HEAD_DIM + d[None, :]
        cos = tl.where(sink_ok, tl.load(SCOS + angle_at, mask=sink_ok, other=0.0),
                       tl.load(BCOS + e * HEAD_DIM + d[None, :] + 0 * r[:, None], mask=bank_ok, other=0.0))  # fmt: skip
        sin = tl.where(sink_ok, tl.load(SSIN + angle_at, mask=sink_ok, other=0.0),
                       tl.load(BSIN + e * HEAD_DIM + d[None, :] + 0 * r[:, None], mask=bank_ok, other=0.0))  # fmt: skip
        key = (x.to(tl.float32) * cos + xp.to(tl.float32) * sign[None, :] * sin).to(dtype)
    else:
        key = x
    v = tl.where(sink_ok, tl.load(SINK_V + sink_at + d[None, :], mask=sink_ok, other=0.0).to(dtype),
                 tl.load(BANK_V + bank_at + d[None, :], mask=bank_ok, other=0.0).to(dtype))  # fmt: skip
    bias = tl.where(is_sink, 0.0, tl.load(BANK_B + (row * NSEG + e) * M + slot, mask=is_bank, other=0.0))
    out_ok = (r < total)[:, None] & d_ok[None, :]
    out_at = ((row * NSEG + e) * total + r)[:, None] * HEAD_DIM + d[None, :]
    tl.store(OUT_K + out_at, key, mask=out_ok)
    tl.store(OUT_V + out_at, v, mask=out_ok)
    tl.store(OUT_B + (row * NSEG + e) * total + r, bias.to(OUT_B.dtype.element_ty), mask=r < total)
