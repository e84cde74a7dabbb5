"""Triton kernels of fused differential attention: forward, and the backward's dK/dV and dQ.

One index space serves the plain causal pattern and the bounded one (docs/semantics.md section 3):

* query rows are tokens ``t = q_start + i``; program blocks are aligned to absolute token
  positions (``BLOCK_M`` divides the segment length in the usual configs), so a block sits in
  one segment and sees one bank snapshot;
* main keys are tokens ``j = q_start - K_OFFSET + jj``; a row sees ``lo(t) <= j <= t`` with
  ``lo = 0`` (causal) or ``lo = max(Ns, seg_start(t) - W + S)`` (bounded window); a negative ``K_OFFSET``
  (forward only) says the keys are one segment's window, ``j = seg_start(q_start) - W + S + jj`` (-1: a graph
  decoder's per-segment buffer, so a step inside a segment reads no ring), or start at token 0, ``j = jj`` (-2: a
  static cache read at a position held on the device);
* "extra" keys are per segment (sinks, then exact and summary bank slots): ``E`` of them with a
  float32 logit offset each (``log g``, ``-inf`` for an empty slot); the first ``NUM_SINK``
  are sinks and follow causality (``e <= t``).

``q_start`` is read from a device tensor so that a decode step can be captured in a CUDA
graph and replayed at later positions.

The forward keeps both streams (signal and noise query of head ``h``) in one program: each K/V
tile is loaded once and feeds two online softmaxes; the epilogue forms
``signal - lambda * noise`` and the optional per-head RMSNorm in registers. The softmax runs in
base 2 (``exp2``) with the scale folded in; the saved log-sum-exp is in base-2 units.

With ``ROTATE`` (inference, the streams-as-rows layout) the forward reads the projection's queries before RoPE
instead of the stacked, rotated ones, and rotates them in its prologue as ``rope_triton._rotate_kernel`` would (RoPE
from the chunk's float32 tables, plus the head's learned angles for the noise rows): the stacking pass and the
stacked tensor's write and read are left out.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .rope_triton import _pair_partner

LOG2E = 1.4426950408889634


@triton.jit
def _window_low(t, BOUNDED: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr, NUM_SINK: tl.constexpr):
    """Lowest main-key token visible from query token ``t``."""
    if BOUNDED:
        low = (t // SEG) * SEG - WINDOW + SEG
        low = tl.maximum(low, NUM_SINK)
    else:
        low = t * 0
    return tl.maximum(low, 0)


@triton.jit
def _main_mask(
    t, j, jj, row_ok, LK, BOUNDED: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr, NUM_SINK: tl.constexpr
):
    low = _window_low(t, BOUNDED, WINDOW, SEG, NUM_SINK)
    return (
        row_ok[:, None]
        & (j[None, :] <= t[:, None])
        & (j[None, :] >= low[:, None])
        & (jj[None, :] >= 0)
        & (jj[None, :] < LK)
    )


@triton.jit
def _extra_mask(t, e, row_ok, in_seg, E, NUM_SINK: tl.constexpr):
    causal = (e[None, :] >= NUM_SINK) | (e[None, :] <= t[:, None])  # sinks follow causality
    return row_ok[:, None] & in_seg[:, None] & (e[None, :] < E) & causal


@triton.jit
def _online_update(s2, m, total, acc, vt, PREC: tl.constexpr):
    """One tile of an online softmax in base 2: returns the new max, sum and accumulator."""
    m_new = tl.maximum(m, tl.max(s2, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s2 - m_new[:, None])
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return m_new, total, acc


@triton.jit
def _tile_ranges(t_first, t_last, k_start, LK, BLOCK_N: tl.constexpr, BOUNDED: tl.constexpr, WINDOW: tl.constexpr,
                 SEG: tl.constexpr, NUM_SINK: tl.constexpr):  # fmt: skip
    """Key-tile ranges of a query block: ``[head, full_lo)`` and ``[full_hi, end)`` need masks,
    ``[full_lo, full_hi)`` is visible from every row (no mask: most of the work)."""
    jj_lo = tl.maximum(_window_low(t_first, BOUNDED, WINDOW, SEG, NUM_SINK) - k_start, 0)
    end = tl.minimum(t_last - k_start + 1, LK)
    head = (jj_lo // BLOCK_N) * BLOCK_N
    low_last = tl.maximum(_window_low(t_last, BOUNDED, WINDOW, SEG, NUM_SINK) - k_start, 0)
    full_lo = tl.minimum(tl.maximum(((low_last + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, head), end)
    full_hi = tl.minimum(((t_first - k_start + 1) // BLOCK_N) * BLOCK_N, (LK // BLOCK_N) * BLOCK_N)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    full_hi = tl.maximum(full_hi, full_lo)
    return head, full_lo, full_hi, end


@triton.jit
def _main_kv_tile(k_base, v_base, skl, svl, jj, LK, d, d_ok, MASKED: tl.constexpr):
    """Main keys and values ``jj`` (rows beyond the keys zero where ``MASKED``)."""
    if MASKED:
        kv_mask = ((jj >= 0) & (jj < LK))[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    kt = tl.load(k_base + jj[:, None] * skl + d[None, :], mask=kv_mask, other=0.0)
    vt = tl.load(v_base + jj[:, None] * svl + d[None, :], mask=kv_mask, other=0.0)
    return kt, vt


@triton.jit
def _extra_kv_tile(ek_base, ev_base, eb_base, seke, seve, e, d, d_ok, E):
    """Extra keys and values ``e`` of a segment and their logit offsets in base 2 (``-inf`` beyond ``E``)."""
    e_mask = (e < E)[:, None] & d_ok[None, :]
    kt = tl.load(ek_base + e[:, None] * seke + d[None, :], mask=e_mask, other=0.0)
    vt = tl.load(ev_base + e[:, None] * seve + d[None, :], mask=e_mask, other=0.0)
    bias = tl.load(eb_base + e, mask=e < E, other=float("-inf")) * 1.4426950408889634
    return kt, vt, bias


@triton.jit
def _fwd_main_tiles(q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, k_base, v_base, skl, svl, lo, hi, t, row_ok,
                    k_start, LK, d, d_ok, qk_scale, MASKED: tl.constexpr, DIFF: tl.constexpr, BOUNDED: tl.constexpr,
                    WINDOW: tl.constexpr, SEG: tl.constexpr, NUM_SINK: tl.constexpr, BLOCK_N: tl.constexpr,
                    PREC: tl.constexpr):  # fmt: skip
    """Main-key tiles ``[lo, hi)`` of both streams: each K/V tile is loaded once."""
    for n0 in range(lo, hi, BLOCK_N):
        jj = n0 + tl.arange(0, BLOCK_N)
        kt, vt = _main_kv_tile(k_base, v_base, skl, svl, jj, LK, d, d_ok, MASKED)
        s2 = tl.dot(q_sig, tl.trans(kt), input_precision=PREC) * qk_scale
        if MASKED:
            mask = _main_mask(t, k_start + jj, jj, row_ok, LK, BOUNDED, WINDOW, SEG, NUM_SINK)
            s2 = tl.where(mask, s2, float("-inf"))
        m_s, l_s, acc_s = _online_update(s2, m_s, l_s, acc_s, vt, PREC)
        if DIFF:
            s2 = tl.dot(q_noi, tl.trans(kt), input_precision=PREC) * qk_scale
            if MASKED:
                s2 = tl.where(mask, s2, float("-inf"))
            m_n, l_n, acc_n = _online_update(s2, m_n, l_n, acc_n, vt, PREC)
    return m_s, l_s, acc_s, m_n, l_n, acc_n


@triton.jit
def _key_start(q_start, K_OFFSET, WINDOW: tl.constexpr, SEG: tl.constexpr):
    """Token index of main key 0: ``q_start - K_OFFSET``, or with ``SEGMENT_WINDOW`` (-1) the query segment's window
    buffer's first token, ``b - W + S``, or with ``KEYS_FROM_ZERO`` (-2) token 0."""
    if K_OFFSET == -2:
        k_start = q_start * 0
    elif K_OFFSET < 0:
        k_start = (q_start // SEG) * SEG - WINDOW + SEG
    else:
        k_start = q_start - K_OFFSET
    return k_start


@triton.jit
def _empty_streams(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Running max, sum and accumulator of both streams' online softmaxes, before any key."""
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    return m, total, acc, m, total, acc


@triton.jit
def _fwd_extra_tile(q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, ek_base, ev_base, eb_base, seke, seve, e, d, d_ok,
                    t, row_ok, in_seg, E, qk_scale, DIFF: tl.constexpr, NUM_SINK: tl.constexpr,
                    PREC: tl.constexpr):  # fmt: skip
    """One tile ``e`` of a segment's extra keys (sinks, bank slots with their logit offsets) for both streams."""
    kt, vt, bias = _extra_kv_tile(ek_base, ev_base, eb_base, seke, seve, e, d, d_ok, E)
    mask = _extra_mask(t, e, row_ok, in_seg, E, NUM_SINK)
    s2 = tl.dot(q_sig, tl.trans(kt), input_precision=PREC) * qk_scale + bias[None, :]
    m_s, l_s, acc_s = _online_update(tl.where(mask, s2, float("-inf")), m_s, l_s, acc_s, vt, PREC)
    if DIFF:
        s2 = tl.dot(q_noi, tl.trans(kt), input_precision=PREC) * qk_scale + bias[None, :]
        m_n, l_n, acc_n = _online_update(tl.where(mask, s2, float("-inf")), m_n, l_n, acc_n, vt, PREC)
    return m_s, l_s, acc_s, m_n, l_n, acc_n


@triton.jit
def _rows_main_tiles(q, m, total, acc, k_base, v_base, skl, svl, lo, hi, t, row_ok, k_start, LK, d, d_ok, qk_scale,
                     MASKED: tl.constexpr, BOUNDED: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr,
                     NUM_SINK: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Main-key tiles ``[lo, hi)`` of one online softmax whose rows are both streams' queries (``STREAMS_AS_ROWS``):
    one product a tile for the two."""
    for n0 in range(lo, hi, BLOCK_N):
        jj = n0 + tl.arange(0, BLOCK_N)
        kt, vt = _main_kv_tile(k_base, v_base, skl, svl, jj, LK, d, d_ok, MASKED)
        s2 = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        if MASKED:
            mask = _main_mask(t, k_start + jj, jj, row_ok, LK, BOUNDED, WINDOW, SEG, NUM_SINK)
            s2 = tl.where(mask, s2, float("-inf"))
        m, total, acc = _online_update(s2, m, total, acc, vt, PREC)
    return m, total, acc


@triton.jit
def _rows_extra_tile(q, m, total, acc, ek_base, ev_base, eb_base, seke, seve, e, d, d_ok, t, row_ok, in_seg, E,
                     qk_scale, NUM_SINK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One tile ``e`` of a segment's extra keys for the rows of ``_rows_main_tiles``."""
    kt, vt, bias = _extra_kv_tile(ek_base, ev_base, eb_base, seke, seve, e, d, d_ok, E)
    s2 = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale + bias[None, :]
    s2 = tl.where(_extra_mask(t, e, row_ok, in_seg, E, NUM_SINK), s2, float("-inf"))
    return _online_update(s2, m, total, acc, vt, PREC)


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``0 .. BLOCK_M - 1`` and ``BLOCK_M ..`` of a ``(2 * BLOCK_M, BLOCK_D)`` tile, as two tiles."""
    return tl.split(tl.permute(tl.reshape(x, (2, BLOCK_M, BLOCK_D)), (1, 2, 0)))


@triton.jit
def _noise_rows(cos, sin, noise, TCOS, TSIN, d, d_ok):
    """The angles of rows marked ``noise`` turned further by the head's noise angles (cos(a + b), sin(a + b))."""
    tcos = tl.load(TCOS + d, mask=d_ok, other=1.0)[None, :]
    tsin = tl.load(TSIN + d, mask=d_ok, other=0.0)[None, :]
    turned_cos = tl.where(noise[:, None], cos * tcos - sin * tsin, cos)
    return turned_cos, tl.where(noise[:, None], sin * tcos + cos * tsin, sin)


@triton.jit
def _rotated_rows(x_base, i, row_ok, noise, d, d_ok, sxl, COS, SIN, TCOS, TSIN, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, DIFF: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
    """Query rows rotated from the projection's ``x`` (before RoPE; row ``i`` of one head at ``x_base``): RoPE at the
    rows' positions (``COS``, ``SIN``: the chunk's ``(L, HEAD_DIM)`` float32 tables), plus the head's noise angles
    (``TCOS``, ``TSIN``: ``HEAD_DIM`` float32 each) on the rows marked ``noise``, in float32 and rounded to ``x``'s
    dtype, the arithmetic of ``rope_triton._rotate_kernel``.

    Pairs ``(d, d + HEAD_DIM / 2)`` of a power-of-two head size are rotated as two half tiles (the tables repeat
    across the halves), so that at most six half tiles of float32 are live; otherwise each element's partner is
    loaded as in the stacking kernel (four whole tiles live)."""
    rows = x_base + i[:, None] * sxl
    if HALF and HEAD_DIM == BLOCK_D:
        HALF_D: tl.constexpr = HEAD_DIM // 2
        dh = tl.arange(0, HALF_D)
        mask = row_ok[:, None]
        cos = tl.load(COS + i[:, None] * HEAD_DIM + dh[None, :], mask=mask, other=0.0)
        sin = tl.load(SIN + i[:, None] * HEAD_DIM + dh[None, :], mask=mask, other=0.0)
        if DIFF:
            cos, sin = _noise_rows(cos, sin, noise, TCOS, TSIN, dh, dh < HALF_D)
        x1 = tl.load(rows + dh[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(rows + HALF_D + dh[None, :], mask=mask, other=0.0).to(tl.float32)
        first = (x1 * cos - x2 * sin).to(x_base.dtype.element_ty)
        second = (x2 * cos + x1 * sin).to(x_base.dtype.element_ty)
        # (rows, 2, HALF_D) in order: the first half's columns, then the second's
        return tl.reshape(tl.permute(tl.join(first, second), (0, 2, 1)), (first.shape[0], HEAD_DIM))
    else:
        partner, sign = _pair_partner(d, HEAD_DIM, HALF)
        mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32) * sign[None, :]
        cos = tl.load(COS + i[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
        sin = tl.load(SIN + i[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
        if DIFF:
            cos, sin = _noise_rows(cos, sin, noise, TCOS, TSIN, d, d_ok)
        return (x * cos + xp * sin).to(x_base.dtype.element_ty)


@triton.jit
def _fwd_streams_as_rows(LAM, NW, OUT, sqs, sql, skl, svl, slb, slh, seks, seke, sevs, seve, sebs, sob, sol, soh,
                         sas, sal, sss, q_base, k_base, v_base, ek_head, ev_head, eb_head, a_base, s_base, b64, h, g,
                         first, q_start, k_start, L, LK, E, GROUP, qk_scale, eps, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         DIFF: tl.constexpr, BOUNDED: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr,
                         NUM_SINK: tl.constexpr, HAS_EXTRAS: tl.constexpr, NORM: tl.constexpr,
                         STORE_STREAMS: tl.constexpr, PREC: tl.constexpr, COS, SIN, TCOS, TSIN, ROTATE: tl.constexpr,
                         HALF: tl.constexpr):  # fmt: skip
    """The forward of one query block with both streams as the rows of one tile: rows ``0 .. BLOCK_M - 1`` the signal
    queries of the block's tokens, rows ``BLOCK_M ..`` their noise queries. One product of ``2 * BLOCK_M`` rows a K/V
    tile feeds both online softmaxes (each row its own), and each warp group of an 8-warp program holds one stream's
    rows: no warp computes a row another also computes (the two-tile form's ``BLOCK_M = 64`` products at 8 warps
    lay the same rows on both warp groups). With ``ROTATE`` ``q_base`` is the KV head's first head in the
    projection's queries (before RoPE, ``sqs`` apart), rotated here (``_rotated_rows``)."""
    STREAMS: tl.constexpr = 2 if DIFF else 1
    ROWS: tl.constexpr = STREAMS * BLOCK_M
    r = tl.arange(0, ROWS)
    t = first + r % BLOCK_M
    i = t - q_start
    row_ok = (i >= 0) & (i < L)
    stream = g + (r // BLOCK_M) * GROUP  # the row's query in Q's stream dimension
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    if ROTATE:
        q = _rotated_rows(q_base + g * sqs, i, row_ok, r >= BLOCK_M, d, d_ok, sql, COS, SIN, TCOS + h * HEAD_DIM,
                          TSIN + h * HEAD_DIM, HEAD_DIM, BLOCK_D, DIFF, HALF)  # fmt: skip
    else:
        q = tl.load(q_base + stream[:, None] * sqs + i[:, None] * sql + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    m = tl.full([ROWS], -1.0e30, tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)

    t_first = tl.maximum(first, q_start)
    t_last = tl.minimum(first + BLOCK_M, q_start + L) - 1
    head, full_lo, full_hi, end = _tile_ranges(t_first, t_last, k_start, LK, BLOCK_N, BOUNDED, WINDOW, SEG, NUM_SINK)
    # the masked tiles before the full ones, the full ones, the masked ones after (``_tile_ranges``)
    m, total, acc = _rows_main_tiles(q, m, total, acc, k_base, v_base, skl, svl, head, full_lo, t, row_ok, k_start, LK,
                                     d, d_ok, qk_scale, True, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N,
                                     PREC)  # fmt: skip
    m, total, acc = _rows_main_tiles(q, m, total, acc, k_base, v_base, skl, svl, full_lo, full_hi, t, row_ok, k_start,
                                     LK, d, d_ok, qk_scale, False, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N,
                                     PREC)  # fmt: skip
    m, total, acc = _rows_main_tiles(q, m, total, acc, k_base, v_base, skl, svl, full_hi, end, t, row_ok, k_start, LK,
                                     d, d_ok, qk_scale, True, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N,
                                     PREC)  # fmt: skip
    if HAS_EXTRAS:
        s0 = q_start // SEG
        for sidx in range(t_first // SEG, t_last // SEG + 1):
            in_seg = (t // SEG) == sidx
            eseg = (sidx - s0).to(tl.int64)
            for e0 in range(0, E, BLOCK_E):
                m, total, acc = _rows_extra_tile(
                    q, m, total, acc, ek_head + eseg * seks, ev_head + eseg * sevs, eb_head + eseg * sebs, seke, seve,
                    e0 + tl.arange(0, BLOCK_E), d, d_ok, t, row_ok, in_seg, E, qk_scale, NUM_SINK, PREC,
                )  # fmt: skip

    total = tl.where(total == 0.0, 1.0, total)
    streams = acc / total[:, None]  # each row its stream's attention
    tm = first + tl.arange(0, BLOCK_M)
    im = tm - q_start
    ok = (im >= 0) & (im < L)
    if DIFF:
        a_sig, a_noi = _halves(streams, BLOCK_M, BLOCK_D)
        lam = tl.load(LAM + b64 * slb + h * slh + im, mask=ok, other=0.0)
        out = a_sig - lam[:, None] * a_noi
    else:
        out = streams
    if NORM:
        mean_sq = tl.sum(out * out, 1) / HEAD_DIM
        w = tl.load(NW + h * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
        out = out * tl.rsqrt(mean_sq + eps)[:, None] * w[None, :]
    tl.store(OUT + b64 * sob + im[:, None] * sol + h * soh + d[None, :], out.to(OUT.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])  # fmt: skip
    if STORE_STREAMS:
        tl.store(a_base + stream[:, None] * sas + i[:, None] * sal + d[None, :], streams.to(a_base.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
        tl.store(s_base + stream * sss + i, m + tl.log2(total), mask=row_ok)


# Lengths and offsets change with every chunk (a 1,024-token chunk, a shorter last one, a one-token decode step):
# left unspecialised, one compiled binary serves them all instead of one per value class (each compile takes seconds).
# So are the strides of the lambda (its rows are the chunk's length: a 403-token tail is not a multiple of 16) and of
# the extras' logit offsets (segments x slots), both read as short vectors; the keys' and values' strides keep their
# divisibility (every one a multiple of the head size), which their tile loads are vectorised on.
@triton.jit(do_not_specialize=["L", "LK", "K_OFFSET", "E", "slb", "slh", "sebb", "sebh", "sebs"])
def _fwd_kernel(
    Q,
    K,
    V,
    LAM,
    EK,
    EV,
    EB,
    NW,
    POS,
    OUT,
    A,
    LSE,
    sqb,
    sqh,
    sqs,
    sql,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    slb,
    slh,
    sekb,
    sekh,
    seks,
    seke,
    sevb,
    sevh,
    sevs,
    seve,
    sebb,
    sebh,
    sebs,
    sob,
    sol,
    soh,
    sab,
    sah,
    sas,
    sal,
    ssb,
    ssh,
    sss,
    L,
    LK,
    K_OFFSET,
    E,
    NUM_HEADS,
    GROUP,
    qk_scale,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DIFF: tl.constexpr,
    BOUNDED: tl.constexpr,
    WINDOW: tl.constexpr,
    SEG: tl.constexpr,
    NUM_SINK: tl.constexpr,
    HAS_EXTRAS: tl.constexpr,
    NORM: tl.constexpr,
    STORE_STREAMS: tl.constexpr,
    PREC: tl.constexpr,
    STREAMS_AS_ROWS: tl.constexpr = False,
    COS=None,
    SIN=None,
    TCOS=None,
    TSIN=None,
    ROTATE: tl.constexpr = False,
    HALF: tl.constexpr = True,
):
    tl.static_assert(not ROTATE or (STREAMS_AS_ROWS and not STORE_STREAMS), "ROTATE: streams as rows, inference")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    kvh = h // GROUP
    g = h % GROUP
    q_start = tl.load(POS).to(tl.int32)
    k_start = _key_start(q_start, K_OFFSET, WINDOW, SEG)
    first = (q_start // BLOCK_M) * BLOCK_M + pid_m * BLOCK_M
    if first >= q_start + L:
        return
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    if STREAMS_AS_ROWS:
        _fwd_streams_as_rows(
            LAM, NW, OUT, sqs, sql, skl, svl, slb, slh, seks, seke, sevs, seve, sebs, sob, sol, soh, sas, sal, sss,
            Q + b64 * sqb + kvh64 * sqh, K + b64 * skb + kvh64 * skh, V + b64 * svb + kvh64 * svh,
            EK + b64 * sekb + kvh64 * sekh, EV + b64 * sevb + kvh64 * sevh, EB + b64 * sebb + kvh64 * sebh,
            A + b64 * sab + kvh64 * sah, LSE + b64 * ssb + kvh64 * ssh, b64, h, g, first, q_start, k_start, L, LK, E,
            GROUP, qk_scale, eps, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_E, DIFF, BOUNDED, WINDOW, SEG, NUM_SINK,
            HAS_EXTRAS, NORM, STORE_STREAMS, PREC, COS, SIN, TCOS, TSIN, ROTATE, HALF,
        )  # fmt: skip
    else:
        t = first + tl.arange(0, BLOCK_M)
        i = t - q_start
        row_ok = (i >= 0) & (i < L)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM

        q_base = Q + b64 * sqb + kvh64 * sqh
        qmask = row_ok[:, None] & d_ok[None, :]
        q_sig = tl.load(q_base + g * sqs + i[:, None] * sql + d[None, :], mask=qmask, other=0.0)
        if DIFF:
            q_noi = tl.load(q_base + (GROUP + g) * sqs + i[:, None] * sql + d[None, :], mask=qmask, other=0.0)
        else:
            q_noi = q_sig

        m_s, l_s, acc_s, m_n, l_n, acc_n = _empty_streams(BLOCK_M, BLOCK_D)

        t_first = tl.maximum(first, q_start)
        t_last = tl.minimum(first + BLOCK_M, q_start + L) - 1
        k_base = K + b64 * skb + kvh64 * skh
        v_base = V + b64 * svb + kvh64 * svh
        head, full_lo, full_hi, end = _tile_ranges(
            t_first, t_last, k_start, LK, BLOCK_N, BOUNDED, WINDOW, SEG, NUM_SINK
        )
        m_s, l_s, acc_s, m_n, l_n, acc_n = _fwd_main_tiles(
            q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, k_base, v_base, skl, svl, head, full_lo, t, row_ok, k_start,
            LK, d, d_ok, qk_scale, True, DIFF, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N, PREC,
        )  # fmt: skip
        m_s, l_s, acc_s, m_n, l_n, acc_n = _fwd_main_tiles(
            q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, k_base, v_base, skl, svl, full_lo, full_hi, t, row_ok,
            k_start, LK, d, d_ok, qk_scale, False, DIFF, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N, PREC,
        )  # fmt: skip
        m_s, l_s, acc_s, m_n, l_n, acc_n = _fwd_main_tiles(
            q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, k_base, v_base, skl, svl, full_hi, end, t, row_ok, k_start,
            LK, d, d_ok, qk_scale, True, DIFF, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N, PREC,
        )  # fmt: skip

        if HAS_EXTRAS:
            s0 = q_start // SEG
            for sidx in range(t_first // SEG, t_last // SEG + 1):
                in_seg = (t // SEG) == sidx
                eseg = (sidx - s0).to(tl.int64)
                ek_base = EK + b64 * sekb + kvh64 * sekh + eseg * seks
                ev_base = EV + b64 * sevb + kvh64 * sevh + eseg * sevs
                eb_base = EB + b64 * sebb + kvh64 * sebh + eseg * sebs
                for e0 in range(0, E, BLOCK_E):
                    m_s, l_s, acc_s, m_n, l_n, acc_n = _fwd_extra_tile(
                        q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, ek_base, ev_base, eb_base, seke, seve,
                        e0 + tl.arange(0, BLOCK_E), d, d_ok, t, row_ok, in_seg, E, qk_scale, DIFF, NUM_SINK, PREC,
                    )  # fmt: skip

        l_s = tl.where(l_s == 0.0, 1.0, l_s)
        a_sig = acc_s / l_s[:, None]
        if DIFF:
            l_n = tl.where(l_n == 0.0, 1.0, l_n)
            a_noi = acc_n / l_n[:, None]
            lam = tl.load(LAM + b64 * slb + h * slh + i, mask=row_ok, other=0.0)
            out = a_sig - lam[:, None] * a_noi
        else:
            a_noi = a_sig
            out = a_sig
        if NORM:
            mean_sq = tl.sum(out * out, 1) / HEAD_DIM
            w = tl.load(NW + h * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
            out = out * tl.rsqrt(mean_sq + eps)[:, None] * w[None, :]
        tl.store(OUT + b64 * sob + i[:, None] * sol + h * soh + d[None, :], out.to(OUT.dtype.element_ty), mask=qmask)
        if STORE_STREAMS:
            a_base = A + b64 * sab + kvh64 * sah
            s_base = LSE + b64 * ssb + kvh64 * ssh
            tl.store(a_base + g * sas + i[:, None] * sal + d[None, :], a_sig.to(A.dtype.element_ty), mask=qmask)
            tl.store(s_base + g * sss + i, m_s + tl.log2(l_s), mask=row_ok)
            if DIFF:
                tl.store(
                    a_base + (GROUP + g) * sas + i[:, None] * sal + d[None, :], a_noi.to(A.dtype.element_ty), mask=qmask
                )
                tl.store(s_base + (GROUP + g) * sss + i, m_n + tl.log2(l_n), mask=row_ok)


@triton.jit
def _row_tile(q_base, da_base, s_base, t_base, stream, sqs, sql, sas, sal, sss, tq, q_start, L, d, d_ok):
    """Loads one stream's query rows ``tq``: q, dA, lse and delta (masked rows are zero)."""
    i = tq - q_start
    ok = (i >= 0) & (i < L)
    mask = ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + stream * sqs + i[:, None] * sql + d[None, :], mask=mask, other=0.0)
    da = tl.load(da_base + stream * sas + i[:, None] * sal + d[None, :], mask=mask, other=0.0)
    lse = tl.load(s_base + stream * sss + i, mask=ok, other=0.0)
    delta = tl.load(t_base + stream * sss + i, mask=ok, other=0.0)
    return q, da, lse, delta, ok


@triton.jit
def _bwd_dkdv_main_kernel(
    Q,
    K,
    V,
    DA,
    LSE,
    DELTA,
    POS,
    DK,
    DV,
    sqb,
    sqh,
    sqs,
    sql,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sab,
    sah,
    sas,
    sal,
    ssb,
    ssh,
    sss,
    sdkb,
    sdkh,
    sdkl,
    sdvb,
    sdvh,
    sdvl,
    L,
    LK,
    K_OFFSET,
    NUM_KV,
    STREAMS,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDED: tl.constexpr,
    WINDOW: tl.constexpr,
    SEG: tl.constexpr,
    NUM_SINK: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // NUM_KV).to(tl.int64)
    kvh64 = (pid_bh % NUM_KV).to(tl.int64)
    q_start = tl.load(POS).to(tl.int32)
    k_start = q_start - K_OFFSET
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    jj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = k_start + jj
    kv_mask = (jj < LK)[:, None] & d_ok[None, :]
    kt = tl.load(K + b64 * skb + kvh64 * skh + jj[:, None] * skl + d[None, :], mask=kv_mask, other=0.0)
    vt = tl.load(V + b64 * svb + kvh64 * svh + jj[:, None] * svl + d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    j_first = k_start + pid_n * BLOCK_N
    j_last = tl.minimum(j_first + BLOCK_N, k_start + LK) - 1
    t_lo = tl.maximum(j_first, q_start)
    if BOUNDED:
        # the last query whose window still reaches j_last: its segment starts at most j + W - S
        t_hi = ((j_last + WINDOW - SEG) // SEG) * SEG + SEG - 1
        t_hi = tl.minimum(t_hi, q_start + L - 1)
    else:
        t_hi = q_start + L - 1
    q_base = Q + b64 * sqb + kvh64 * sqh
    da_base = DA + b64 * sab + kvh64 * sah
    s_base = LSE + b64 * ssb + kvh64 * ssh
    t_base = DELTA + b64 * ssb + kvh64 * ssh
    if (j_last >= 0) & (t_lo <= t_hi):
        for stream in range(0, STREAMS):
            for m0 in range((t_lo // BLOCK_M) * BLOCK_M, t_hi + 1, BLOCK_M):
                tq = m0 + tl.arange(0, BLOCK_M)
                q, da, lse, delta, ok = _row_tile(
                    q_base, da_base, s_base, t_base, stream, sqs, sql, sas, sal, sss, tq, q_start, L, d, d_ok
                )
                mask = _main_mask(tq, j, jj, ok, LK, BOUNDED, WINDOW, SEG, NUM_SINK)
                s2 = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
                p = tl.where(mask, tl.exp2(s2 - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(da.dtype)), da, input_precision=PREC)
                dp = tl.dot(da, tl.trans(vt), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(
        DK + b64 * sdkb + kvh64 * sdkh + jj[:, None] * sdkl + d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(DV + b64 * sdvb + kvh64 * sdvh + jj[:, None] * sdvl + d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_extras_kernel(
    Q,
    EK,
    EV,
    EB,
    DA,
    LSE,
    DELTA,
    POS,
    DEK,
    DEV,
    DEB,
    sqb,
    sqh,
    sqs,
    sql,
    sekb,
    sekh,
    seks,
    seke,
    sevb,
    sevh,
    sevs,
    seve,
    sebb,
    sebh,
    sebs,
    sab,
    sah,
    sas,
    sal,
    ssb,
    ssh,
    sss,
    L,
    E,
    NUM_KV,
    STREAMS,
    E_TILES,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SEG: tl.constexpr,
    NUM_SINK: tl.constexpr,
    PREC: tl.constexpr,
):
    """dK, dV and d(bias) of one tile of one segment's extra keys (grads have the inputs' strides)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    eseg = pid // E_TILES
    e = (pid % E_TILES) * BLOCK_E + tl.arange(0, BLOCK_E)
    b64 = (pid_bh // NUM_KV).to(tl.int64)
    kvh64 = (pid_bh % NUM_KV).to(tl.int64)
    q_start = tl.load(POS).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    e_ok = e < E
    e_mask = e_ok[:, None] & d_ok[None, :]
    ek_off = b64 * sekb + kvh64 * sekh + eseg.to(tl.int64) * seks + e[:, None] * seke + d[None, :]
    ev_off = b64 * sevb + kvh64 * sevh + eseg.to(tl.int64) * sevs + e[:, None] * seve + d[None, :]
    eb_off = b64 * sebb + kvh64 * sebh + eseg.to(tl.int64) * sebs + e
    kt = tl.load(EK + ek_off, mask=e_mask, other=0.0)
    vt = tl.load(EV + ev_off, mask=e_mask, other=0.0)
    bias = tl.load(EB + eb_off, mask=e_ok, other=float("-inf")) * 1.4426950408889634
    dk = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_E], tl.float32)
    sidx = q_start // SEG + eseg
    t_lo = tl.maximum(sidx * SEG, q_start)
    t_hi = tl.minimum(sidx * SEG + SEG, q_start + L) - 1
    q_base = Q + b64 * sqb + kvh64 * sqh
    da_base = DA + b64 * sab + kvh64 * sah
    s_base = LSE + b64 * ssb + kvh64 * ssh
    t_base = DELTA + b64 * ssb + kvh64 * ssh
    for stream in range(0, STREAMS):
        for m0 in range((t_lo // BLOCK_M) * BLOCK_M, t_hi + 1, BLOCK_M):
            tq = m0 + tl.arange(0, BLOCK_M)
            q, da, lse, delta, ok = _row_tile(
                q_base, da_base, s_base, t_base, stream, sqs, sql, sas, sal, sss, tq, q_start, L, d, d_ok
            )
            in_seg = (tq // SEG) == sidx
            mask = _extra_mask(tq, e, ok, in_seg, E, NUM_SINK)
            s2 = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale + bias[None, :]
            p = tl.where(mask, tl.exp2(s2 - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(da.dtype)), da, input_precision=PREC)
            dp = tl.dot(da, tl.trans(vt), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            db += tl.sum(ds, 0)
    tl.store(DEK + ek_off, (dk * scale).to(DEK.dtype.element_ty), mask=e_mask)
    tl.store(DEV + ev_off, dv.to(DEV.dtype.element_ty), mask=e_mask)
    tl.store(DEB + eb_off, db, mask=e_ok)


@triton.jit
def _dq_main_tiles(dq, q, da, lse, delta, k_base, v_base, skl, svl, lo, hi, tq, ok, k_start, LK, d, d_ok, qk_scale,
                   MASKED: tl.constexpr, BOUNDED: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr,
                   NUM_SINK: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    for n0 in range(lo, hi, BLOCK_N):
        jj = n0 + tl.arange(0, BLOCK_N)
        kt, vt = _main_kv_tile(k_base, v_base, skl, svl, jj, LK, d, d_ok, MASKED)
        s2 = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        p = tl.exp2(s2 - lse[:, None])
        if MASKED:
            p = tl.where(_main_mask(tq, k_start + jj, jj, ok, LK, BOUNDED, WINDOW, SEG, NUM_SINK), p, 0.0)
        dp = tl.dot(da, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    EK,
    EV,
    EB,
    DA,
    LSE,
    DELTA,
    POS,
    DQ,
    sqb,
    sqh,
    sqs,
    sql,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sekb,
    sekh,
    seks,
    seke,
    sevb,
    sevh,
    sevs,
    seve,
    sebb,
    sebh,
    sebs,
    sab,
    sah,
    sas,
    sal,
    ssb,
    ssh,
    sss,
    L,
    LK,
    K_OFFSET,
    E,
    NUM_KV,
    STREAMS,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BOUNDED: tl.constexpr,
    WINDOW: tl.constexpr,
    SEG: tl.constexpr,
    NUM_SINK: tl.constexpr,
    HAS_EXTRAS: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ of one block of rows of one stacked query head (dQ has the strides of Q)."""
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    stream = pid % STREAMS
    kvh64 = ((pid // STREAMS) % NUM_KV).to(tl.int64)
    b64 = (pid // (STREAMS * NUM_KV)).to(tl.int64)
    q_start = tl.load(POS).to(tl.int32)
    k_start = q_start - K_OFFSET
    first = (q_start // BLOCK_M) * BLOCK_M + pid_m * BLOCK_M
    if first >= q_start + L:
        return
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    tq = first + tl.arange(0, BLOCK_M)
    q_base = Q + b64 * sqb + kvh64 * sqh
    q, da, lse, delta, ok = _row_tile(
        q_base,
        DA + b64 * sab + kvh64 * sah,
        LSE + b64 * ssb + kvh64 * ssh,
        DELTA + b64 * ssb + kvh64 * ssh,
        stream,
        sqs,
        sql,
        sas,
        sal,
        sss,
        tq,
        q_start,
        L,
        d,
        d_ok,
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    t_first = tl.maximum(first, q_start)
    t_last = tl.minimum(first + BLOCK_M, q_start + L) - 1
    k_base = K + b64 * skb + kvh64 * skh
    v_base = V + b64 * svb + kvh64 * svh
    head, full_lo, full_hi, end = _tile_ranges(t_first, t_last, k_start, LK, BLOCK_N, BOUNDED, WINDOW, SEG, NUM_SINK)
    dq = _dq_main_tiles(dq, q, da, lse, delta, k_base, v_base, skl, svl, head, full_lo, tq, ok, k_start, LK, d, d_ok,
                        qk_scale, True, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N, PREC)  # fmt: skip
    dq = _dq_main_tiles(dq, q, da, lse, delta, k_base, v_base, skl, svl, full_lo, full_hi, tq, ok, k_start, LK, d,
                        d_ok, qk_scale, False, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N, PREC)  # fmt: skip
    dq = _dq_main_tiles(dq, q, da, lse, delta, k_base, v_base, skl, svl, full_hi, end, tq, ok, k_start, LK, d, d_ok,
                        qk_scale, True, BOUNDED, WINDOW, SEG, NUM_SINK, BLOCK_N, PREC)  # fmt: skip
    if HAS_EXTRAS:
        s0 = q_start // SEG
        for sidx in range(t_first // SEG, t_last // SEG + 1):
            in_seg = (tq // SEG) == sidx
            eseg = (sidx - s0).to(tl.int64)
            for e0 in range(0, E, BLOCK_E):
                e = e0 + tl.arange(0, BLOCK_E)
                e_mask = (e < E)[:, None] & d_ok[None, :]
                kt = tl.load(
                    EK + b64 * sekb + kvh64 * sekh + eseg * seks + e[:, None] * seke + d[None, :],
                    mask=e_mask,
                    other=0.0,
                )
                vt = tl.load(
                    EV + b64 * sevb + kvh64 * sevh + eseg * sevs + e[:, None] * seve + d[None, :],
                    mask=e_mask,
                    other=0.0,
                )
                bias = (
                    tl.load(EB + b64 * sebb + kvh64 * sebh + eseg * sebs + e, mask=e < E, other=float("-inf"))
                    * 1.4426950408889634
                )
                mask = _extra_mask(tq, e, ok, in_seg, E, NUM_SINK)
                s2 = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale + bias[None, :]
                p = tl.where(mask, tl.exp2(s2 - lse[:, None]), 0.0)
                dp = tl.dot(da, tl.trans(vt), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    i = tq - q_start
    tl.store(
        DQ + b64 * sqb + kvh64 * sqh + stream * sqs + i[:, None] * sql + d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=ok[:, None] & d_ok[None, :],
    )


# A one-token step (decode) has one query row per head: the forward above would run one program per head walking
# every key tile in turn (about 18 us a layer for SmolLM2's 9 heads over 384 slots on an H100, 9 busy SMs). The
# split forward spreads the keys instead: program (KV head, split) scores one stretch of the main keys or one chunk
# of the extras for every query head of the group at once (the heads are the rows of its products, so each K/V tile
# is read once per group, not once per head) and writes their partial softmaxes (running max, sum, unnormalised
# output, per stream); a second kernel merges the splits per head and forms ``signal - lambda * noise`` and the norm,
# as the forward's epilogue does.
@triton.jit(do_not_specialize=["LK", "K_OFFSET", "E", "MAIN_SPLITS", "MAIN_CHUNK", "SPLITS"])
def _decode_split_kernel(
    Q,
    K,
    V,
    EK,
    EV,
    EB,
    POS,
    PM,
    PL,
    PACC,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sekb,
    sekh,
    seke,
    sevb,
    sevh,
    seve,
    sebb,
    sebh,
    LK,
    K_OFFSET,
    E,
    NUM_HEADS,
    GROUP,
    MAIN_SPLITS,
    MAIN_CHUNK,
    SPLITS,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DIFF: tl.constexpr,
    BOUNDED: tl.constexpr,
    WINDOW: tl.constexpr,
    SEG: tl.constexpr,
    NUM_SINK: tl.constexpr,
    HAS_EXTRAS: tl.constexpr,
    PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # a programmatic dependent launch: the kernel before has finished and its writes are visible past here
        gdc_wait()
        gdc_launch_dependents()
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    num_kv_heads = NUM_HEADS // GROUP
    b = pid_bkv // num_kv_heads
    kvh = pid_bkv % num_kv_heads
    q_start = tl.load(POS).to(tl.int32)
    k_start = _key_start(q_start, K_OFFSET, WINDOW, SEG)
    # row r is query head r of the group (the token is the same for all: one position); BLOCK_R >= 16 rows so that
    # the products have the matrix units' smallest shape
    r = tl.arange(0, BLOCK_R)
    row_ok = r < GROUP
    t = q_start + r * 0
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    qmask = row_ok[:, None] & d_ok[None, :]
    q_base = Q + b64 * sqb + kvh64 * sqh
    q_sig = tl.load(q_base + r[:, None] * sqs + d[None, :], mask=qmask, other=0.0)
    if DIFF:
        q_noi = tl.load(q_base + (GROUP + r)[:, None] * sqs + d[None, :], mask=qmask, other=0.0)
    else:
        q_noi = q_sig
    m_s, l_s, acc_s, m_n, l_n, acc_n = _empty_streams(BLOCK_R, BLOCK_D)
    if split < MAIN_SPLITS:
        head, _, _, end = _tile_ranges(q_start, q_start, k_start, LK, BLOCK_N, BOUNDED, WINDOW, SEG, NUM_SINK)
        lo = tl.maximum(split * MAIN_CHUNK, head)
        hi = tl.minimum(split * MAIN_CHUNK + MAIN_CHUNK, end)
        m_s, l_s, acc_s, m_n, l_n, acc_n = _fwd_main_tiles(
            q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, K + b64 * skb + kvh64 * skh, V + b64 * svb + kvh64 * svh,
            skl, svl, lo, hi, t, row_ok, k_start, LK, d, d_ok, qk_scale, True, DIFF, BOUNDED, WINDOW, SEG, NUM_SINK,
            BLOCK_N, PREC,
        )  # fmt: skip
    elif HAS_EXTRAS:  # one chunk of the extras of the token's segment (the first of the chunk: index 0)
        m_s, l_s, acc_s, m_n, l_n, acc_n = _fwd_extra_tile(
            q_sig, q_noi, m_s, l_s, acc_s, m_n, l_n, acc_n, EK + b64 * sekb + kvh64 * sekh,
            EV + b64 * sevb + kvh64 * sevh, EB + b64 * sebb + kvh64 * sebh, seke, seve,
            (split - MAIN_SPLITS) * BLOCK_E + tl.arange(0, BLOCK_E), d, d_ok, t, row_ok, row_ok, E, qk_scale, DIFF,
            NUM_SINK, PREC,
        )  # fmt: skip
    # partials laid out (B * H, 2 streams, SPLITS[, BLOCK_D]), contiguous; row r is head b * H + kvh * GROUP + r
    at = (pid_bkv * GROUP + r).to(tl.int64) * 2 * SPLITS + split
    tl.store(PM + at, m_s, mask=row_ok)
    tl.store(PL + at, l_s, mask=row_ok)
    tl.store(PACC + at[:, None] * BLOCK_D + d[None, :], acc_s, mask=row_ok[:, None])
    if DIFF:
        tl.store(PM + at + SPLITS, m_n, mask=row_ok)
        tl.store(PL + at + SPLITS, l_n, mask=row_ok)
        tl.store(PACC + (at[:, None] + SPLITS) * BLOCK_D + d[None, :], acc_n, mask=row_ok[:, None])


@triton.jit
def _merge_splits(PM, PL, PACC, row, SPLITS, s, d, BLOCK_D: tl.constexpr):
    """One stream's attention output from its splits' partial softmaxes (base 2)."""
    s_ok = s < SPLITS
    at = row * SPLITS + s
    m = tl.load(PM + at, mask=s_ok, other=-1.0e30)
    total = tl.load(PL + at, mask=s_ok, other=0.0)
    acc = tl.load(PACC + at[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(total * weight, 0)
    total = tl.where(total == 0.0, 1.0, total)
    return tl.sum(acc * weight[:, None], 0) / total


@triton.jit(do_not_specialize=["SPLITS"])
def _decode_combine_kernel(
    PM,
    PL,
    PACC,
    LAM,
    NW,
    OUT,
    slb,
    slh,
    sob,
    soh,
    SPLITS,
    NUM_HEADS,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DIFF: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # a programmatic dependent launch: the kernel before has finished and its writes are visible past here
        gdc_wait()
        gdc_launch_dependents()
    pid_bh = tl.program_id(0)
    b64 = (pid_bh // NUM_HEADS).to(tl.int64)
    h = pid_bh % NUM_HEADS
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = pid_bh.to(tl.int64) * 2
    out = _merge_splits(PM, PL, PACC, row, SPLITS, s, d, BLOCK_D)
    if DIFF:
        lam = tl.load(LAM + b64 * slb + h * slh)
        out = out - lam * _merge_splits(PM, PL, PACC, row + 1, SPLITS, s, d, BLOCK_D)
    if NORM:
        mean_sq = tl.sum(tl.where(d_ok, out * out, 0.0), 0) / HEAD_DIM
        w = tl.load(NW + h * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
        out = out * tl.rsqrt(mean_sq + eps) * w
    tl.store(OUT + b64 * sob + h * soh + d, out.to(OUT.dtype.element_ty), mask=d_ok)
