"""Triton kernel of fused bank routing (docs/kernels.md): every segment boundary of a prefill chunk in one launch.

Grid ``(B * Hkv, 2)``: program ``(row, 0)`` owns the exact bank of one (batch, KV head), program
``(row, 1)`` its summary bank. The two banks of a head never read each other (they share only
the evicted tokens, which both programs load), so splitting them halves the sequential chain
at no cost in determinism. Each program loops over the chunk's segments in order; at each one
it routes the ``S`` tokens that leave the window and writes the snapshot that segment's queries
see. The snapshot it has just written is the bank the next segment starts from, so the bank
rows live in memory (L1/L2) and only the per-slot bookkeeping (gate, last use, fill) lives in
registers; the final bank is copied out of the last snapshot.

Token indices and validity come from ``start`` inside the kernel, read from a device scalar (so a
launch captured in a CUDA graph replays at any position, and the eager and captured paths share
one binary): a segment that does not route in the reference has no valid token here, which
leaves the bank untouched.

Decisions are made in float32 with the reference's tie rules spelled out as index arithmetic
(no sorting): candidates rank by gate descending then token index ascending, victims by
free-first then last use then slot index, argmax ties go to the lower slot. Cosines are raw dot
products divided by the two norms. With float32 tensors the dots run as plain float32 FMAs
(``input_precision="ieee"``, the reduction dimension cut into short chunks so the operands fit
in registers). With bfloat16/float16 banks and tokens the same dots run on tensor cores: the
products of two 16-bit floats are exact in float32 and accumulate in float32, so the result is
what float32 arithmetic gives (no tf32 rounding anywhere); the summary's gate-weighted sums
split the float32 weights into three 16-bit parts for the same reason.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny, the reference's clamp
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's clamp
LN2 = tl.constexpr(0.6931471805599453)
PHASE_SLOTS = tl.constexpr(8)  # stamps a segment and program (``PHASES``)


@triton.jit
def _dot_nt(a, b, LOWP: tl.constexpr):
    """``a (M, K) @ b (N, K)^T`` in float32: tensor cores on 16-bit inputs (exact products), else FMAs."""
    if LOWP:
        return tl.dot(a, tl.trans(b))
    else:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")


@triton.jit
def _weight_parts(w, dtype: tl.constexpr, LOWP: tl.constexpr):
    """``w (S, M)`` float32 weights, transposed, as the operands of ``_dot_weights``.

    For 16-bit tokens the weights are split into three ``dtype`` parts whose sum is ``w`` to
    float32 precision: each part's products with the tokens are exact, so three tensor-core dots
    give the float32 result. Computed once per segment, used for every column chunk.
    """
    wt = tl.trans(w)
    if LOWP:
        hi = wt.to(dtype)
        rest = wt - hi.to(tl.float32)
        mid = rest.to(dtype)
        lo = (rest - mid.to(tl.float32)).to(dtype)
        return hi, mid, lo
    else:
        return wt, wt, wt


@triton.jit
def _dot_weights(hi, mid, lo, x, LOWP: tl.constexpr):
    """``w^T @ x`` in float32 from the parts ``_weight_parts`` made."""
    if LOWP:
        return tl.dot(hi, x) + tl.dot(mid, x) + tl.dot(lo, x)
    else:
        return tl.dot(hi, x.to(tl.float32), input_precision="ieee")


@triton.jit
def _tile_mask(ok, dk, DH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``ok`` and columns below ``DH``; with no padded column the mask is constant along a row,
    which lets loads and stores use vector instructions."""
    if BLOCK_D == DH:
        return ok[:, None]  # broadcast along the row by tl.load / tl.store
    else:
        return ok[:, None] & (dk < DH)[None, :]


@triton.jit
def _to_storage(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Round float32 ``x`` to the bank dtype, to nearest even like torch.

    Triton's interpreter truncates float32 to bf16, so there the rounding is done by hand.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _rows(base, rows, ok, dk, DH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns ``dk`` of rows ``rows`` (one per lane of ``ok``) of a ``(*, DH)`` matrix; zeros where masked."""
    ptrs = base + rows[:, None] * DH + dk[None, :]  # int32 offsets inside one head's slab
    return tl.load(ptrs, mask=_tile_mask(ok, dk, DH, BLOCK_D), other=0.0)


@triton.jit
def _inv_norm(sq):
    """Reciprocal of ``F.normalize``'s divisor ``max(||x||, 1e-12)``, from a squared norm.

    Cosines are raw dots times two of these: multiplications instead of per-element divisions.
    """
    return tl.fdiv(1.0, tl.maximum(tl.sqrt(sq), NORM_EPS))  # approximate division: ~1 ulp, cheap


@triton.jit
def _row_norms(base, rows, ok, BLOCK_M: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr):
    """Inverse norms of some rows of a ``(*, DH)`` matrix (the bank before the first segment)."""
    sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, BLOCK_D, BK):
        x = _rows(base, rows, ok, k0 + tl.arange(0, BK), DH, BLOCK_D).to(tl.float32)
        sq += tl.sum(x * x, 1)
    return _inv_norm(sq)


@triton.jit
def _token_bank_dots(ext_v, row, valid, bank_v, slot, slot_ok, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
                     DH: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr, LOWP: tl.constexpr):  # fmt: skip
    """Raw value dot products of the segment's tokens with the bank rows, and the tokens' squared norms."""
    dots = tl.zeros([BLOCK_S, BLOCK_M], tl.float32)
    sq = tl.zeros([BLOCK_S], tl.float32)
    for k0 in range(0, BLOCK_D, BK):
        dk = k0 + tl.arange(0, BK)
        v = _rows(ext_v, row, valid, dk, DH, BLOCK_D)
        dots += _dot_nt(v, _rows(bank_v, slot, slot_ok, dk, DH, BLOCK_D), LOWP)
        vf = v.to(tl.float32)
        sq += tl.sum(vf * vf, 1)
    return dots, sq


@triton.jit
def _token_dots_and_gram(ext_v, row, valid, bank_v, slot, slot_ok, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
                         DH: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr, LOWP: tl.constexpr):  # fmt: skip
    """Raw dots of the tokens with the bank rows and with each other (each token chunk loaded once)."""
    dots = tl.zeros([BLOCK_S, BLOCK_M], tl.float32)
    gram = tl.zeros([BLOCK_S, BLOCK_S], tl.float32)
    for k0 in range(0, BLOCK_D, BK):
        dk = k0 + tl.arange(0, BK)
        v = _rows(ext_v, row, valid, dk, DH, BLOCK_D)
        dots += _dot_nt(v, _rows(bank_v, slot, slot_ok, dk, DH, BLOCK_D), LOWP)
        gram += _dot_nt(v, v, LOWP)
    return dots, gram


@triton.jit
def _token_gram(ext_v, row, valid, BLOCK_S: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr,
                BK: tl.constexpr, LOWP: tl.constexpr):  # fmt: skip
    """Raw dots of the segment's tokens with each other (the summary bank needs them only to seed)."""
    gram = tl.zeros([BLOCK_S, BLOCK_S], tl.float32)
    for k0 in range(0, BLOCK_D, BK):
        v = _rows(ext_v, row, valid, k0 + tl.arange(0, BK), DH, BLOCK_D)
        gram += _dot_nt(v, v, LOWP)
    return gram


@triton.jit
def _gram_cosines(gram, BLOCK_S: tl.constexpr):
    """Cosines from a Gram matrix, and the inverse norms from its diagonal."""
    j = tl.arange(0, BLOCK_S)
    inv = _inv_norm(tl.sum(tl.where(j[:, None] == j[None, :], gram, 0.0), 1))
    return gram * inv[:, None] * inv[None, :], inv


@triton.jit
def _segment_tokens(e, seg0, start, ext_g, SEG: tl.constexpr, WINDOW: tl.constexpr, NUM_SINK: tl.constexpr,
                    BLOCK_S: tl.constexpr):  # fmt: skip
    """The tokens leaving the window at the ``e``-th segment boundary of the chunk.

    Returns ``(first, at, valid, gate)``: the token index of the first evicted token (int64),
    its row in the extended sequence (int32; token ``j`` is row ``at + j``), whether each token
    is routable (the segment begins inside the chunk, the token is neither a sink nor before the
    stream) and its gate. Per-token arithmetic stays in int32.
    """
    j = tl.arange(0, BLOCK_S)
    seg_begin = seg0 + e * SEG
    first = seg_begin - WINDOW
    at = (seg_begin - start).to(tl.int32)
    lowest = tl.minimum(tl.maximum(NUM_SINK - first, -1), BLOCK_S).to(tl.int32)  # first routable j
    # row >= j says seg_begin >= start, as a vector (the interpreter mishandles scalar & vector masks)
    valid = (j < SEG) & (at + j >= j) & (j >= lowest)
    gate = tl.load(ext_g + at + j, mask=valid, other=0.0)
    return first, at, valid, gate


@triton.jit
def _gate_order(gate, BLOCK_S: tl.constexpr):
    """``above[j, i]``: token ``i`` ranks above token ``j``: higher gate, or equal gate and lower index."""
    idx = tl.arange(0, BLOCK_S)
    g_j = gate[:, None]
    g_i = gate[None, :]
    return (g_i > g_j) | ((g_i == g_j) & (idx[None, :] < idx[:, None]))


@triton.jit
def _bank_base(e, in_base, snap, prev_slot, DH: tl.constexpr):
    """Rows of the bank a segment starts from: the input bank, then the previous segment's snapshot."""
    if e == 0:
        base = in_base
    else:
        base = snap + prev_slot * DH
    return base


@triton.jit
def _exact_decisions(cos, pair_cos, gate, first, valid, xlast, xfill, tau_exact, novelty, match, ME: tl.constexpr,
                     MAX_INSERTS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_ME: tl.constexpr):  # fmt: skip
    """One segment's exact-bank decisions (``banks._route_exact``).

    Returns ``(xlast, write, src)``: last use after hits, which slots are written and the
    candidate (0..S-1) each written slot takes.
    """
    p = tl.arange(0, BLOCK_ME)
    j = tl.arange(0, BLOCK_S)
    filled = xfill != 0
    cand = valid & (gate > tau_exact)
    cos = tl.where(filled[None, :], cos, NEG_INF)
    best = tl.max(cos, 1)
    best_slot = tl.min(tl.where(cos == best[:, None], p[None, :], BLOCK_ME), 1)
    hit = cand & (best >= match)
    # near-duplicates of any higher-ranked candidate of the segment are not novel
    above = _gate_order(gate, BLOCK_S)
    duplicate = tl.max((cand[None, :] & above & (pair_cos >= novelty)).to(tl.int32), 1) > 0
    novel = cand & (best < novelty) & ~duplicate

    # hits refresh last use to the latest hitting token, before victims are chosen
    hit_on = hit[:, None] & (best_slot[:, None] == p[None, :])
    latest = tl.max(tl.where(hit_on, j[:, None], -1), 0)
    slot_hit = latest >= 0
    xlast = tl.where(slot_hit, tl.maximum(xlast, first + latest), xlast)

    # victim rank: free slots first (key -1), then least recent, then lower slot; hit slots excluded
    eligible = (p < ME) & ~slot_hit
    key = tl.where(filled, xlast, -1)
    before = eligible[None, :] & (
        (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (p[None, :] < p[:, None]))
    )
    victim_rank = tl.sum(before.to(tl.int32), 1)
    # the r-th novel candidate (gate desc, index asc) takes the r-th victim
    novel_rank = tl.sum((novel[None, :] & above).to(tl.int32), 1)
    inserts = tl.minimum(tl.sum(novel.to(tl.int32), 0), tl.sum(eligible.to(tl.int32), 0))
    write = eligible & (victim_rank < tl.minimum(inserts, MAX_INSERTS))
    takes = novel[None, :] & (novel_rank[None, :] == victim_rank[:, None])
    src = tl.sum(tl.where(takes, j[None, :], 0), 1)
    return xlast, write, src


@triton.jit
def _copy_rows(dst, src_base, src_rows, take, cur_base, ok, DH: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """Write bank rows to ``dst``: token row ``src_rows`` where ``take``, else the current row.

    Returns the inverse norms of the rows written (as stored), for the next segment's cosines.
    """
    p = tl.arange(0, BLOCK_M)
    sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, BLOCK_D, BK):
        dk = k0 + tl.arange(0, BK)
        cur = _rows(cur_base, p, ok & ~take, dk, DH, BLOCK_D)
        new = _to_storage(_rows(src_base, src_rows, take, dk, DH, BLOCK_D).to(tl.float32), cur.dtype, INTERPRET)
        out = tl.where(take[:, None], new, cur)
        tl.store(dst + p[:, None] * DH + dk[None, :], out, mask=_tile_mask(ok, dk, DH, BLOCK_D))
        stored = out.to(tl.float32)
        sq += tl.sum(stored * stored, 1)
    return _inv_norm(sq)


@triton.jit
def _copy_block(dst, src, ok, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr):
    """Copy rows ``ok`` of a ``(BLOCK_M, DH)`` block (the last snapshot into the returned bank)."""
    p = tl.arange(0, BLOCK_M)
    for k0 in range(0, BLOCK_D, BK):
        dk = k0 + tl.arange(0, BK)
        tl.store(
            dst + p[:, None] * DH + dk[None, :],
            _rows(src, p, ok, dk, DH, BLOCK_D),
            mask=_tile_mask(ok, dk, DH, BLOCK_D),
        )


@triton.jit
def _log(x, INTERPRET: tl.constexpr):
    """Natural log; on the GPU through the one-instruction ``lg2.approx`` (relative error ~2^-22): the
    accurate libdevice polynomial costs ~25 instructions per copy of a vector every thread holds."""
    if INTERPRET:
        return tl.log(x)
    else:
        log2 = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        return log2 * LN2


@triton.jit
def _stamp(stamps, e, phase, ON: tl.constexpr, INTERPRET: tl.constexpr):
    """With ``ON``, the multiprocessor's cycle counter at the end of ``phase`` of segment ``e`` (``PHASES`` in
    ``_route_chunk_kernel``; zeros in the interpreter): where a segment's time goes, for benchmarks/routing_phases.py.
    A barrier first, so that the stamp follows every thread's part of the phase."""
    if ON:
        tl.debug_barrier()
        if INTERPRET:
            now = tl.zeros([1], tl.int64)
        else:
            now = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [tl.zeros([1], tl.int32)],
                                            dtype=tl.int64, is_pure=False, pack=1)  # fmt: skip
        tl.store(stamps + e * PHASE_SLOTS + phase + tl.arange(0, 1), now)


@triton.jit
def _store_bias(snap_b, slot0, bg, bfill, NUM: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """A bank's logit offsets in a snapshot: ``log g`` of filled slots, ``-inf`` for empty ones."""
    p = tl.arange(0, BLOCK_M)
    filled = bfill != 0
    bias = tl.where(filled, _log(tl.where(filled, bg, 1.0), INTERPRET), NEG_INF)
    tl.store(snap_b + slot0 + p, bias, mask=p < NUM)


@triton.jit
def _exact_program(row_id, ext_k, ext_v, ext_g, ex_k, ex_v, ex_g, ex_last, ex_fill, o_k, o_v, o_g, o_last, o_fill,
                   snap_k, snap_v, snap_b, dec, flag, start, nseg, tau_exact, novelty, match, DH: tl.constexpr,
                   ME: tl.constexpr, M_TOTAL: tl.constexpr, SEG: tl.constexpr, WINDOW: tl.constexpr,
                   NUM_SINK: tl.constexpr, MAX_INSERTS: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_ME: tl.constexpr, BLOCK_D: tl.constexpr, COS_BK: tl.constexpr, COPY_BK: tl.constexpr,
                   LOWP: tl.constexpr, INTERPRET: tl.constexpr, WRITE_K: tl.constexpr,
                   KEY_FOLLOWERS: tl.constexpr, stamps, PHASES: tl.constexpr):  # fmt: skip
    """The exact bank of one head through every segment of the chunk (``banks._route_exact``). With
    ``KEY_FOLLOWERS`` it publishes each segment's writes (``dec``, then ``flag``) for ``_exact_keys`` instead of
    writing key rows."""
    p = tl.arange(0, BLOCK_ME)
    p_ok = p < ME
    bank = row_id * ME
    xg = tl.load(ex_g + bank + p, mask=p_ok, other=1.0)
    xlast = tl.load(ex_last + bank + p, mask=p_ok, other=0)
    xfill = tl.load(ex_fill + bank + p, mask=p_ok, other=0).to(tl.int32)
    xinv = _row_norms(ex_v + bank * DH, p, p_ok, BLOCK_ME, DH, BLOCK_D, COPY_BK)
    seg0 = start // SEG * SEG
    slot0 = row_id * nseg * M_TOTAL  # this head's first snapshot row
    for e in range(nseg):
        _stamp(stamps, e, 0, PHASES, INTERPRET)
        first, at, valid, gate = _segment_tokens(e, seg0, start, ext_g, SEG, WINDOW, NUM_SINK, BLOCK_S)
        row = at + tl.arange(0, BLOCK_S)
        cur_k = _bank_base(e, ex_k + bank * DH, snap_k, slot0 + (e - 1) * M_TOTAL, DH)
        cur_v = _bank_base(e, ex_v + bank * DH, snap_v, slot0 + (e - 1) * M_TOTAL, DH)
        dots, gram = _token_dots_and_gram(ext_v, row, valid, cur_v, p, p_ok, BLOCK_S, BLOCK_ME, DH, BLOCK_D,
                                          COS_BK, LOWP)  # fmt: skip
        pair_cos, vinv = _gram_cosines(gram, BLOCK_S)
        cos = dots * vinv[:, None] * xinv[None, :]
        _stamp(stamps, e, 1, PHASES, INTERPRET)
        xlast, write, src = _exact_decisions(
            cos, pair_cos, gate, first, valid, xlast, xfill, tau_exact, novelty, match, ME, MAX_INSERTS,
            BLOCK_S, BLOCK_ME,
        )  # fmt: skip
        src_row = at + src
        xg = tl.where(write, tl.load(ext_g + src_row, mask=write, other=0.0), xg)
        xlast = tl.where(write, first + src, xlast)
        xfill = tl.where(write, 1, xfill)
        here = slot0 + e * M_TOTAL
        _stamp(stamps, e, 2, PHASES, INTERPRET)
        if KEY_FOLLOWERS:
            tl.store(dec + (row_id * nseg + e) * BLOCK_ME + p, tl.where(write, src_row, -1))
            _publish(flag, e)
        elif WRITE_K:
            _copy_rows(
                snap_k + here * DH, ext_k, src_row, write, cur_k, p_ok, DH, BLOCK_ME, BLOCK_D, COPY_BK, INTERPRET
            )
        xinv = _copy_rows(
            snap_v + here * DH, ext_v, src_row, write, cur_v, p_ok, DH, BLOCK_ME, BLOCK_D, COPY_BK, INTERPRET
        )
        _stamp(stamps, e, 3, PHASES, INTERPRET)
        _store_bias(snap_b, here, xg, xfill, ME, BLOCK_ME, INTERPRET)
        tl.debug_barrier()  # the next segment reads these rows from other threads
        _stamp(stamps, e, 4, PHASES, INTERPRET)
    last = slot0 + (nseg - 1) * M_TOTAL
    if WRITE_K and not KEY_FOLLOWERS:
        _copy_block(o_k + bank * DH, snap_k + last * DH, p_ok, DH, BLOCK_ME, BLOCK_D, COPY_BK)
    _copy_block(o_v + bank * DH, snap_v + last * DH, p_ok, DH, BLOCK_ME, BLOCK_D, COPY_BK)
    tl.store(o_g + bank + p, xg, mask=p_ok)
    tl.store(o_last + bank + p, xlast, mask=p_ok)
    tl.store(o_fill + bank + p, xfill.to(o_fill.dtype.element_ty), mask=p_ok)


@triton.jit
def _pick_seeds(proto_cos, avail, empty, gate, ext_v, row, valid, DH: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_MS: tl.constexpr, BLOCK_D: tl.constexpr, COS_BK: tl.constexpr, LOWP: tl.constexpr):  # fmt: skip
    """Seed empty prototypes farthest first (``banks._pick_seeds``), one per round.

    Each round the lowest empty slot takes the available candidate whose highest cosine to the
    filled prototypes is lowest (ties: higher gate, then lower index); its cosines then join
    ``nearest`` and become that slot's column. The candidate-candidate cosines are computed only
    when some slot is empty. Returns ``(cosines after seeding, seed_src, avail)``.
    """
    j = tl.arange(0, BLOCK_S)
    q = tl.arange(0, BLOCK_MS)
    full = proto_cos
    nearest = tl.max(proto_cos, 1)
    seed_src = tl.full([BLOCK_MS], -1, tl.int32)
    rounds = tl.minimum(tl.sum(empty.to(tl.int32), 0), tl.sum(avail.to(tl.int32), 0))
    if rounds > 0:
        pair_cos, _ = _gram_cosines(_token_gram(ext_v, row, valid, BLOCK_S, DH, BLOCK_D, COS_BK, LOWP), BLOCK_S)
        for _ in range(rounds):
            key = tl.where(avail, nearest, POS_INF)
            tied = avail & (key == tl.min(key, 0))
            tied_gate = tl.where(tied, gate, NEG_INF)
            pick = tl.min(tl.where(tied & (tied_gate == tl.max(tied_gate, 0)), j, BLOCK_S), 0)
            slot = tl.min(tl.where(empty, q, BLOCK_MS), 0)
            seed_src = tl.where(q == slot, pick, seed_src)
            empty = empty & (q != slot)
            avail = avail & (j != pick)
            col = tl.sum(tl.where((j == pick)[None, :], pair_cos, 0.0), 1)
            nearest = tl.maximum(nearest, col)
            full = tl.where((q == slot)[None, :], col[:, None], full)
    return full, seed_src, avail


@triton.jit
def _ema_rows(dst, ext, cur_base, w_hi, w_mid, w_lo, inv_denom, row, valid, seed_row, seeded, updated, q_ok, keep,
              eta, DH: tl.constexpr, BLOCK_MS: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr,
              LOWP: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """New prototype rows: the seed's row or the current one, moved by the EMA where ``updated``.

    Returns the inverse norms of the rows as stored, for the next segment's cosines.
    """
    q = tl.arange(0, BLOCK_MS)
    sq = tl.zeros([BLOCK_MS], tl.float32)
    for k0 in range(0, BLOCK_D, BK):
        dk = k0 + tl.arange(0, BK)
        mean = _dot_weights(w_hi, w_mid, w_lo, _rows(ext, row, valid, dk, DH, BLOCK_D), LOWP) * inv_denom[:, None]
        seed = _rows(ext, seed_row, seeded, dk, DH, BLOCK_D).to(tl.float32)
        base = tl.where(seeded[:, None], seed, _rows(cur_base, q, q_ok & ~seeded, dk, DH, BLOCK_D).to(tl.float32))
        new = _to_storage(tl.where(updated[:, None], keep * base + eta * mean, base), dst.dtype.element_ty, INTERPRET)
        tl.store(dst + q[:, None] * DH + dk[None, :], new, mask=_tile_mask(q_ok, dk, DH, BLOCK_D))
        stored = new.to(tl.float32)
        sq += tl.sum(stored * stored, 1)
    return _inv_norm(sq)


@triton.jit
def _summary_program(row_id, head, ext_k, ext_v, ext_g, eta_ptr, sm_k, sm_v, sm_g, sm_fill, o_k, o_v, o_g, o_fill,
                     snap_k, snap_v, snap_b, dec_i, dec_f, flag, start, nseg, tau_summary, DH: tl.constexpr,
                     ME: tl.constexpr,
                     MS: tl.constexpr, M_TOTAL: tl.constexpr, SEG: tl.constexpr, WINDOW: tl.constexpr,
                     NUM_SINK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_MS: tl.constexpr, BLOCK_D: tl.constexpr,
                     COS_BK: tl.constexpr, EMA_BK: tl.constexpr, LOWP: tl.constexpr,
                     INTERPRET: tl.constexpr, WRITE_K: tl.constexpr, KEY_FOLLOWERS: tl.constexpr, stamps,
                     PHASES: tl.constexpr):  # fmt: skip
    """The summary bank of one head through every segment of the chunk (``banks._route_summary``). With
    ``KEY_FOLLOWERS`` it publishes each segment's members, seeds and updates (``dec_i``, ``dec_f``, then ``flag``)
    for ``_summary_keys`` instead of writing key rows."""
    q = tl.arange(0, BLOCK_MS)
    q_ok = q < MS
    bank = row_id * MS
    sg = tl.load(sm_g + bank + q, mask=q_ok, other=1.0)
    sfill = tl.load(sm_fill + bank + q, mask=q_ok, other=0).to(tl.int32)
    sinv = _row_norms(sm_v + bank * DH, q, q_ok, BLOCK_MS, DH, BLOCK_D, EMA_BK)
    eta = tl.load(eta_ptr + head).to(tl.float32)
    keep = 1.0 - eta
    seg0 = start // SEG * SEG
    slot0 = row_id * nseg * M_TOTAL + ME  # this head's first summary row in the snapshots
    for e in range(nseg):
        _stamp(stamps, e, 0, PHASES, INTERPRET)
        first, at, valid, gate = _segment_tokens(e, seg0, start, ext_g, SEG, WINDOW, NUM_SINK, BLOCK_S)
        row = at + tl.arange(0, BLOCK_S)
        cur_k = _bank_base(e, sm_k + bank * DH, snap_k, slot0 + (e - 1) * M_TOTAL, DH)
        cur_v = _bank_base(e, sm_v + bank * DH, snap_v, slot0 + (e - 1) * M_TOTAL, DH)
        filled = sfill != 0
        cand = valid & (gate > tau_summary)
        dots, vsq = _token_bank_dots(ext_v, row, valid, cur_v, q, q_ok, BLOCK_S, BLOCK_MS, DH, BLOCK_D, COS_BK, LOWP)
        proto_cos = tl.where(filled[None, :], dots * _inv_norm(vsq)[:, None] * sinv[None, :], NEG_INF)
        _stamp(stamps, e, 1, PHASES, INTERPRET)
        full, seed_src, avail = _pick_seeds(
            proto_cos, cand, q_ok & ~filled, gate, ext_v, row, valid, DH, BLOCK_S, BLOCK_MS, BLOCK_D, COS_BK, LOWP
        )
        _stamp(stamps, e, 2, PHASES, INTERPRET)
        seeded = seed_src >= 0
        seed_row = at + seed_src

        # every other candidate joins its most similar prototype (ties to the lower slot)
        best = tl.max(full, 1)
        assign = tl.min(tl.where(full == best[:, None], q[None, :], BLOCK_MS), 1)
        onehot = (avail & (best > NEG_INF))[:, None] & (assign[:, None] == q[None, :])
        weights = tl.where(onehot, gate[:, None], 0.0)
        weight_sum = tl.sum(weights, 0)
        count = tl.sum(onehot.to(tl.float32), 0)
        updated = count > 0
        inv_denom = tl.fdiv(1.0, tl.maximum(weight_sum, FLOAT32_TINY))

        # seeding sets the slot; the EMA then moves every prototype that received members
        here = slot0 + e * M_TOTAL
        w_hi, w_mid, w_lo = _weight_parts(weights, ext_k.dtype.element_ty, LOWP)
        _stamp(stamps, e, 3, PHASES, INTERPRET)
        if KEY_FOLLOWERS:
            _store_summary_decisions(dec_i, dec_f, row_id * nseg + e, avail & (best > NEG_INF), assign, seed_src,
                                     updated, inv_denom, BLOCK_S, BLOCK_MS)  # fmt: skip
            _publish(flag, e)
        elif WRITE_K:
            _ema_rows(snap_k + here * DH, ext_k, cur_k, w_hi, w_mid, w_lo, inv_denom, row, valid, seed_row, seeded,
                      updated, q_ok, keep, eta, DH, BLOCK_MS, BLOCK_D, EMA_BK, LOWP, INTERPRET)  # fmt: skip
        sinv = _ema_rows(snap_v + here * DH, ext_v, cur_v, w_hi, w_mid, w_lo, inv_denom, row, valid, seed_row, seeded,
                         updated, q_ok, keep, eta, DH, BLOCK_MS, BLOCK_D, EMA_BK, LOWP, INTERPRET)  # fmt: skip
        _stamp(stamps, e, 4, PHASES, INTERPRET)
        sg = tl.where(seeded, tl.load(ext_g + seed_row, mask=seeded, other=0.0), sg)
        sg = tl.where(updated, keep * sg + eta * tl.fdiv(weight_sum, tl.maximum(count, 1.0)), sg)
        sfill = tl.where(seeded, 1, sfill)
        _store_bias(snap_b, here, sg, sfill, MS, BLOCK_MS, INTERPRET)
        tl.debug_barrier()  # the next segment reads these rows from other threads
        _stamp(stamps, e, 5, PHASES, INTERPRET)
    last = slot0 + (nseg - 1) * M_TOTAL
    if WRITE_K and not KEY_FOLLOWERS:
        _copy_block(o_k + bank * DH, snap_k + last * DH, q_ok, DH, BLOCK_MS, BLOCK_D, EMA_BK)
    _copy_block(o_v + bank * DH, snap_v + last * DH, q_ok, DH, BLOCK_MS, BLOCK_D, EMA_BK)
    tl.store(o_g + bank + q, sg, mask=q_ok)
    tl.store(o_fill + bank + q, sfill.to(o_fill.dtype.element_ty), mask=q_ok)


@triton.jit
def _publish(flag, e):
    """Tell the bank's key follower that segment ``e``'s decisions are in memory: every thread's stores first
    (the barrier), then the count, with release semantics at GPU scope."""
    tl.debug_barrier()
    tl.atomic_xchg(flag, e + 1, sem="release", scope="gpu")


@triton.jit
def _await(flag, e):
    """Spin until the chain has published segment ``e`` (``_publish``)."""
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    while seen <= e:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")


@triton.jit
def _store_summary_decisions(dec_i, dec_f, at_seg, member, assign, seed_src, updated, inv_denom,
                             BLOCK_S: tl.constexpr, BLOCK_MS: tl.constexpr):  # fmt: skip
    """One segment's summary decisions for ``_summary_keys``: each token's prototype (-1: none), each slot's seed
    (-1: none) and whether it was updated (int32), and each slot's EMA divisor (float32)."""
    j = tl.arange(0, BLOCK_S)
    q = tl.arange(0, BLOCK_MS)
    base = dec_i + at_seg * (BLOCK_S + 2 * BLOCK_MS)
    tl.store(base + j, tl.where(member, assign, -1))
    tl.store(base + BLOCK_S + q, seed_src)
    tl.store(base + BLOCK_S + BLOCK_MS + q, updated.to(tl.int32))
    tl.store(dec_f + at_seg * BLOCK_MS + q, inv_denom)


@triton.jit
def _exact_keys(row_id, ext_k, ex_k, o_k, snap_k, dec, flag, nseg, DH: tl.constexpr, ME: tl.constexpr,
                M_TOTAL: tl.constexpr, BLOCK_ME: tl.constexpr, BLOCK_D: tl.constexpr, COPY_BK: tl.constexpr,
                INTERPRET: tl.constexpr, stamps, PHASES: tl.constexpr):  # fmt: skip
    """The exact bank's key rows, a segment behind its chain: the copies the chain made before, of the slots it
    published as written."""
    p = tl.arange(0, BLOCK_ME)
    p_ok = p < ME
    bank = row_id * ME
    slot0 = row_id * nseg * M_TOTAL
    for e in range(nseg):
        _stamp(stamps, e, 0, PHASES, INTERPRET)
        _await(flag, e)
        _stamp(stamps, e, 1, PHASES, INTERPRET)
        src_row = tl.load(dec + (row_id * nseg + e) * BLOCK_ME + p, cache_modifier=".cg")
        write = p_ok & (src_row >= 0)
        cur_k = _bank_base(e, ex_k + bank * DH, snap_k, slot0 + (e - 1) * M_TOTAL, DH)
        here = slot0 + e * M_TOTAL
        _copy_rows(snap_k + here * DH, ext_k, src_row, write, cur_k, p_ok, DH, BLOCK_ME, BLOCK_D, COPY_BK, INTERPRET)
        tl.debug_barrier()  # the next segment reads these rows from other threads
        _stamp(stamps, e, 2, PHASES, INTERPRET)
    last = slot0 + (nseg - 1) * M_TOTAL
    _copy_block(o_k + bank * DH, snap_k + last * DH, p_ok, DH, BLOCK_ME, BLOCK_D, COPY_BK)


@triton.jit
def _summary_keys(row_id, head, ext_k, ext_g, eta_ptr, sm_k, o_k, snap_k, dec_i, dec_f, flag, start, nseg,
                  DH: tl.constexpr, ME: tl.constexpr, MS: tl.constexpr, M_TOTAL: tl.constexpr, SEG: tl.constexpr,
                  WINDOW: tl.constexpr, NUM_SINK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_MS: tl.constexpr,
                  BLOCK_D: tl.constexpr, EMA_BK: tl.constexpr, LOWP: tl.constexpr,
                  INTERPRET: tl.constexpr, stamps, PHASES: tl.constexpr):  # fmt: skip
    """The summary bank's key rows, a segment behind its chain: the seeds and EMA moves the chain made of its
    values, made of the keys with the weights (members' gates) and divisors it published."""
    q = tl.arange(0, BLOCK_MS)
    q_ok = q < MS
    bank = row_id * MS
    eta = tl.load(eta_ptr + head).to(tl.float32)
    keep = 1.0 - eta
    seg0 = start // SEG * SEG
    slot0 = row_id * nseg * M_TOTAL + ME
    for e in range(nseg):
        first, at, valid, gate = _segment_tokens(e, seg0, start, ext_g, SEG, WINDOW, NUM_SINK, BLOCK_S)
        row = at + tl.arange(0, BLOCK_S)
        _stamp(stamps, e, 0, PHASES, INTERPRET)
        _await(flag, e)
        _stamp(stamps, e, 1, PHASES, INTERPRET)
        base = dec_i + (row_id * nseg + e) * (BLOCK_S + 2 * BLOCK_MS)
        member = tl.load(base + tl.arange(0, BLOCK_S), cache_modifier=".cg")
        seed_src = tl.load(base + BLOCK_S + q, cache_modifier=".cg")
        updated = tl.load(base + BLOCK_S + BLOCK_MS + q, cache_modifier=".cg") != 0
        inv_denom = tl.load(dec_f + (row_id * nseg + e) * BLOCK_MS + q, cache_modifier=".cg")
        seeded = seed_src >= 0
        weights = tl.where(member[:, None] == q[None, :], gate[:, None], 0.0)
        cur_k = _bank_base(e, sm_k + bank * DH, snap_k, slot0 + (e - 1) * M_TOTAL, DH)
        here = slot0 + e * M_TOTAL
        w_hi, w_mid, w_lo = _weight_parts(weights, ext_k.dtype.element_ty, LOWP)
        _ema_rows(snap_k + here * DH, ext_k, cur_k, w_hi, w_mid, w_lo, inv_denom, row, valid, at + seed_src, seeded,
                  updated, q_ok, keep, eta, DH, BLOCK_MS, BLOCK_D, EMA_BK, LOWP, INTERPRET)  # fmt: skip
        tl.debug_barrier()  # the next segment reads these rows from other threads
        _stamp(stamps, e, 2, PHASES, INTERPRET)
    last = slot0 + (nseg - 1) * M_TOTAL
    _copy_block(o_k + bank * DH, snap_k + last * DH, q_ok, DH, BLOCK_MS, BLOCK_D, EMA_BK)


@triton.jit(do_not_specialize=["nseg", "ext_len"])
def _route_chunk_kernel(
    ext_k, ext_v, ext_g, eta,
    ex_k, ex_v, ex_g, ex_last, ex_fill, sm_k, sm_v, sm_g, sm_fill,
    o_ex_k, o_ex_v, o_ex_g, o_ex_last, o_ex_fill, o_sm_k, o_sm_v, o_sm_g, o_sm_fill,
    snap_k, snap_v, snap_b, dec_ex, dec_sm_i, dec_sm_f, flags, stamps,
    start_ptr, nseg, ext_len, num_heads,
    tau_exact, tau_summary, novelty, match,
    DH: tl.constexpr, ME: tl.constexpr, MS: tl.constexpr, SEG: tl.constexpr, WINDOW: tl.constexpr,
    NUM_SINK: tl.constexpr, MAX_INSERTS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_ME: tl.constexpr, BLOCK_MS: tl.constexpr, BLOCK_D: tl.constexpr,
    COS_BK: tl.constexpr, EMA_BK: tl.constexpr, LOWP: tl.constexpr, INTERPRET: tl.constexpr,
    WRITE_K: tl.constexpr = True, KEY_FOLLOWERS: tl.constexpr = False, PHASES: tl.constexpr = False,
):  # fmt: skip
    """Program ``(b * Hkv + h, bank)``: route the chunk's segments through one bank of one head. ``WRITE_K=False``
    leaves every key row unwritten (snapshots and banks): a bound, for ``benchmarks/routing_kernel.py``, on a chain
    whose key rows another pass writes (they feed no decision: cosines read values only). ``KEY_FOLLOWERS``: the grid
    is ``(B * Hkv, 4)`` and programs ``(row, 2)`` and ``(row, 3)`` write the exact and summary banks' key rows a
    segment behind their chains, from the decisions the chains publish; blocks start in order of their linear index,
    so every chain is running or done before a follower waits on it. ``PHASES``: each program stores its cycle
    counter at the end of each phase of each segment into ``stamps (B * Hkv, 4, nseg, PHASE_SLOTS)`` int64
    (``_stamp``; benchmarks/routing_phases.py)."""
    row_id = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    start = tl.load(start_ptr).to(tl.int64)  # on the device: a captured launch replays at any position
    ext = row_id * ext_len
    stamps = stamps + (row_id * 4 + which) * nseg * PHASE_SLOTS
    if which == 0:
        if ME > 0:
            _exact_program(
                row_id, ext_k + ext * DH, ext_v + ext * DH, ext_g + ext, ex_k, ex_v, ex_g, ex_last, ex_fill,
                o_ex_k, o_ex_v, o_ex_g, o_ex_last, o_ex_fill, snap_k, snap_v, snap_b, dec_ex, flags + row_id * 2,
                start, nseg,
                tau_exact, novelty, match, DH, ME, ME + MS, SEG, WINDOW, NUM_SINK, MAX_INSERTS,
                BLOCK_S, BLOCK_ME, BLOCK_D, COS_BK, EMA_BK, LOWP, INTERPRET, WRITE_K, KEY_FOLLOWERS, stamps, PHASES,
            )  # fmt: skip
    elif which == 1:
        if MS > 0:
            _summary_program(
                row_id, row_id % num_heads, ext_k + ext * DH, ext_v + ext * DH, ext_g + ext, eta,
                sm_k, sm_v, sm_g, sm_fill, o_sm_k, o_sm_v, o_sm_g, o_sm_fill, snap_k, snap_v, snap_b,
                dec_sm_i, dec_sm_f, flags + row_id * 2 + 1, start, nseg, tau_summary, DH, ME, MS, ME + MS, SEG,
                WINDOW, NUM_SINK, BLOCK_S, BLOCK_MS, BLOCK_D, COS_BK, EMA_BK, LOWP, INTERPRET, WRITE_K, KEY_FOLLOWERS,
                stamps, PHASES,
            )  # fmt: skip
    elif which == 2:
        if ME > 0:
            _exact_keys(
                row_id, ext_k + ext * DH, ex_k, o_ex_k, snap_k, dec_ex, flags + row_id * 2, nseg,
                DH, ME, ME + MS, BLOCK_ME, BLOCK_D, EMA_BK, INTERPRET, stamps, PHASES,
            )  # fmt: skip
    else:
        if MS > 0:
            _summary_keys(
                row_id, row_id % num_heads, ext_k + ext * DH, ext_g + ext, eta, sm_k, o_sm_k, snap_k,
                dec_sm_i, dec_sm_f, flags + row_id * 2 + 1, start, nseg, DH, ME, MS, ME + MS, SEG, WINDOW, NUM_SINK,
                BLOCK_S, BLOCK_MS, BLOCK_D, EMA_BK, LOWP, INTERPRET, stamps, PHASES,
            )  # fmt: skip
