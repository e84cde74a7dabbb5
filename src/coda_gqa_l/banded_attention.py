"""The bounded layer's block-sparse attention for inference on the reference path: the same outputs as
``segment_attention.attend_segments`` (to float rounding) in fewer and larger operations.

``attend_segments`` builds, for each segment of ``S`` queries, its own key block: the ``W`` window keys
unfolded and rotated for that segment, the sinks and the bank snapshot concatenated to them. With small
segments that is most of the work: StreamingLLM's baseline (``S = 4``, ``W = 380``) rotates and copies every
window key ``W / S = 95`` times per chunk, and its 4K-token ingest on one CPU thread spent 31 of 41 s in RoPE and
``torch.cat`` against 8 s in the model's projections.

Here the window keys are rotated once per chunk and read in place:

* relative positions are measured from one base for the whole chunk (``P0 = b0 - W``, ``b0`` the start of the
  chunk's first segment): query ``t`` sits at ``t - P0`` and window key ``j`` at ``j - P0``; the distances
  ``t - j`` are the ones the per-segment frames give, so only float rounding differs;
* queries go in blocks of ``m`` whole segments (``m * S >= 64`` rows); a block's window keys are one contiguous
  slab of ``W + m * S - S`` tokens of the rotated keys (a view, no copy), masked per row to the segment's
  window, so each block is one matrix product; with ``S = 64`` a block is one segment and the slab its ``W``
  keys: the reference's products exactly;
* the sinks and the bank snapshot differ per segment (the sinks' positions move with the segment, the banks
  are routed at its start): they are scored per segment in the segment's own frame (query at ``W + r``), as
  in the reference, and their scores joined to the window's before one softmax.

Only for inference (no gradients are needed; the reference stays what training and the tests use).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import BoundedConfig
from .primitives import RotaryEmbedding, apply_rope

# A block holds whole segments and at least this many query rows, so a small segment does not mean
# many small products (S = 64: one segment per block, S = 4: 16).
_BLOCK_ROWS = 64


def attend_banded(
    q: Tensor,
    ext_k: Tensor,
    ext_v: Tensor,
    sink_k: Tensor,
    sink_v: Tensor,
    bank_k: Tensor,
    bank_v: Tensor,
    bank_bias: Tensor,
    *,
    start: int,
    config: BoundedConfig,
    rope: RotaryEmbedding,
    scale: float,
) -> Tensor:
    """``segment_attention.attend_segments``'s outputs (its arguments and shapes) by the banded path (module
    docstring)."""
    S, W, Ns = config.segment, config.window, config.num_sink
    B, Hkv, Qs, n, D = q.shape
    device = q.device
    relative = config.position_mode == "relative"
    s0 = start // S
    b0 = s0 * S
    lead = start - b0
    nseg = (start + n - 1) // S - s0 + 1
    per_block = max(1, -(-_BLOCK_ROWS // S))  # segments per block
    nblk = -(-nseg // per_block)
    rows = per_block * S  # query rows per block
    span = W + rows - S  # window keys a block reads

    # queries by segment: (B, Hkv, nseg_padded, Q, S, D), padded so that every block is full
    padded = nblk * rows
    qp = torch.zeros(B, Hkv, Qs, padded, D, dtype=torch.float32, device=device)
    qp[:, :, :, lead : lead + n] = q
    r = torch.arange(S, device=device)
    t_pad = b0 + torch.arange(padded, device=device)  # token index of each padded row
    if relative:
        # the window's frame: one base for the chunk
        cos, sin = rope.cos_sin(t_pad - (b0 - W), torch.float32)
        q_window = apply_rope(qp, cos, sin, rope.layout).mul_(scale)
        # the sinks' and banks' frame: the segment's own (query at W + r, as in attend_segments)
        cos, sin = rope.cos_sin(W + r, torch.float32)
        q_segment = apply_rope(qp.view(B, Hkv, Qs, -1, S, D), cos, sin, rope.layout).mul_(scale)
    else:  # keys were rotated when written: queries at their true position in both
        cos, sin = rope.cos_sin(t_pad, torch.float32)
        q_window = apply_rope(qp, cos, sin, rope.layout).mul_(scale)
        q_segment = q_window.view(B, Hkv, Qs, -1, S, D)
    q_window = q_window.view(B, Hkv, Qs, nblk, per_block, S, D).permute(0, 1, 3, 4, 2, 5, 6)
    q_window = q_window.reshape(B, Hkv, nblk, per_block * Qs * S, D)  # rows: segment, stream, row
    q_segment = q_segment.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, -1, Qs * S, D)

    # window keys of tokens b0 - W + S .. b0 + padded - 1, rotated once (zeros past the chunk's end: rows that
    # could see them are padding)
    first = S - lead  # ext index of token b0 - W + S
    need = first + (nblk - 1) * rows + span
    keys = torch.zeros(B, Hkv, need, D, dtype=torch.float32, device=device)
    values = torch.zeros(B, Hkv, need, D, dtype=torch.float32, device=device)
    have = min(need, ext_k.shape[2] - first)
    keys[:, :, :have] = ext_k[:, :, first : first + have]
    values[:, :, :have] = ext_v[:, :, first : first + have]
    if relative:
        cos, sin = rope.cos_sin(S + torch.arange(need, device=device), torch.float32)  # token - (b0 - W)
        keys = apply_rope(keys, cos, sin, rope.layout)

    # per segment: the sinks (rotated at their segment's positions) and the bank snapshot
    seg_start = b0 + torch.arange(nblk * per_block, device=device) * S
    sinks = sink_k.float()[:, :, None].expand(B, Hkv, seg_start.numel(), Ns, D)
    if relative and Ns:
        i = torch.arange(Ns, device=device)
        cos, sin = rope.cos_sin(torch.maximum(i - seg_start[:, None] + W, i - Ns), torch.float32)
        sinks = apply_rope(sinks, cos, sin, rope.layout)
    extra = nblk * per_block - nseg  # padding segments past the chunk: any finite keys will do
    bank_keys, bank_values = _pad_segments(bank_k.float(), extra), _pad_segments(bank_v.float(), extra)
    side_k = torch.cat([sinks, bank_keys], dim=3)  # (B, Hkv, segments, Ns + M, D)
    side_v = torch.cat([sink_v.float()[:, :, None].expand_as(sinks), bank_values], dim=3)
    side_bias = torch.cat(
        [
            torch.zeros(seg_start.numel(), S, Ns, device=device)
            .masked_fill(~(torch.arange(Ns, device=device) <= (seg_start[:, None, None] + r[:, None])), float("-inf"))
            .expand(B, Hkv, -1, S, Ns),
            _pad_segments(bank_bias.float(), extra)[:, :, :, None].expand(-1, -1, -1, S, -1),
        ],
        dim=-1,
    )  # (B, Hkv, segments, S, Ns + M)

    # the window's mask within a block: row (segment u, row rr) sees slab column c iff it lies in the segment's
    # window (c >= u * S) and is not after the query (c <= W - S + u * S + rr)
    c = torch.arange(span, device=device)
    row = torch.arange(rows, device=device)
    band = (c >= (row[:, None] // S) * S) & (c <= W - S + row[:, None])  # (rows, span)
    real = (t_pad >= start) & (t_pad < start + n)  # padding rows get finite logits (no empty softmax row)

    out = torch.empty(B, Hkv, nblk * per_block, Qs, S, D, dtype=torch.float32, device=device)
    for blk in range(nblk):
        segs = slice(blk * per_block, (blk + 1) * per_block)
        slab = slice(blk * rows, blk * rows + span)
        token = b0 - W + S + blk * rows + c  # the slab's tokens
        visible = band & (token >= max(Ns, 0))
        bias_w = torch.zeros(rows, span, device=device).masked_fill_(~visible, float("-inf"))
        block_real = real[blk * rows : (blk + 1) * rows]
        bias_w = torch.where(block_real[:, None], bias_w, 0.0).view(per_block, 1, S, span)
        scores_w = torch.matmul(q_window[:, :, blk], keys[:, :, slab].transpose(-1, -2))
        scores_w = scores_w.view(B, Hkv, per_block, Qs, S, span).add_(bias_w)
        scores_side = torch.matmul(
            q_segment[:, :, segs].reshape(B, Hkv, per_block, Qs * S, D), side_k[:, :, segs].transpose(-1, -2)
        ).view(B, Hkv, per_block, Qs, S, -1)
        side = torch.where(
            block_real.view(per_block, 1, S, 1), side_bias[:, :, segs, None], 0.0
        )  # (B, Hkv, per_block, 1, S, Ns + M)
        scores_side.add_(side)
        probs = torch.softmax(torch.cat([scores_w, scores_side], dim=-1), dim=-1)
        probs_w, probs_side = probs.split([span, probs.shape[-1] - span], dim=-1)
        mixed = torch.matmul(probs_w.reshape(B, Hkv, -1, span), values[:, :, slab])
        mixed = mixed.view(B, Hkv, per_block, Qs * S, D) + torch.matmul(
            probs_side.reshape(B, Hkv, per_block, Qs * S, -1), side_v[:, :, segs]
        )
        out[:, :, segs] = mixed.view(B, Hkv, per_block, Qs, S, D)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, Qs, -1, D)
    return out[:, :, :, lead : lead + n].to(q.dtype)


def _pad_segments(t: Tensor, extra: int) -> Tensor:
    """``t (B, Hkv, segments, ...)`` with ``extra`` zero segments after its own. Not ``F.pad``: before torch 2.10 it
    refuses a tensor with an empty dimension, as the banks of a window-only layer are (no slots)."""
    return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra, *t.shape[3:])], dim=2)
