"""Block-sparse attention of the bounded layer: the PyTorch reference (docs/semantics.md section 3).

Queries are grouped by segment (``S`` tokens starting at ``b = s * S``). A query ``t`` in
segment ``s`` sees, in one softmax:

* the sinks ``i < Ns`` (with ``i <= t``);
* the window tokens ``j`` with ``max(Ns, b - W + S) <= j <= t`` (between ``W - S + 1`` and ``W``
  of them once the stream is long);
* the exact and summary banks as they stood at the start of segment ``s``, each slot's logit
  offset by ``log`` of its gate (empty slots masked).

Window layout for segment ``s`` (``c`` is the column inside the segment's key block)::

    token  j = b - W + S + c,  c = 0 .. W-1
    query  t = b + r,          r = 0 .. S-1
    visible iff c <= W - S + r (causal) and j >= max(Ns, 0)

    c:  0 ............ W-S ............ W-1
    r=0 [x x x x x x x x x x]. . . . . . .     <- W - S + 1 keys
    r=S-1 [x x x x x x x x x x x x x x x x x]  <- W keys

Positions in ``relative`` mode are offsets from the base ``b - W``: the query sits at
``W + r``, window key ``c`` at ``S + c``, every bank slot at ``0``, sink ``i`` at
``max(i - b + W, i - Ns)``. They are the same for every segment, so the numbers stay small
however long the stream. In ``absolute`` mode keys were rotated when written and the query
is rotated at ``t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BoundedConfig
from .primitives import RotaryEmbedding, apply_rope

# Largest score tensor (elements) built at once; segments are processed in groups below it.
_MAX_SCORE_ELEMENTS = 1 << 25


def attend_segments(
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
    """Attention outputs for tokens ``start .. start + n - 1``.

    Args:
        q: ``(B, Hkv, Q, n, Dh)`` stacked queries before RoPE.
        ext_k, ext_v: ``(B, Hkv, W + n, Dh)`` keys (as stored) and values of tokens
            ``start - W .. start + n - 1``; entries for tokens ``< 0`` are ignored.
        sink_k, sink_v: ``(B, Hkv, Ns, Dh)`` sinks, those of this chunk already written.
        bank_k, bank_v: ``(B, Hkv, nseg, M, Dh)`` bank snapshot per segment the chunk touches.
        bank_bias: ``(B, Hkv, nseg, M)`` float32 logit offsets (``log g``; ``-inf`` if empty).
    Returns:
        ``(B, Hkv, Q, n, Dh)`` in the dtype of ``q``.
    """
    S, W, Ns = config.segment, config.window, config.num_sink
    B, Hkv, Qs, n, D = q.shape
    device = q.device
    s0 = start // S
    nseg = (start + n - 1) // S - s0 + 1
    lead = start - s0 * S
    seg_start = (s0 + torch.arange(nseg, device=device)) * S
    r = torch.arange(S, device=device)
    c = torch.arange(W, device=device)
    relative = config.position_mode == "relative"

    # queries, padded so that every segment block is full
    qp = F.pad(q, (0, 0, lead, nseg * S - lead - n)).view(B, Hkv, Qs, nseg, S, D)
    q_pos = (W + r).expand(nseg, S) if relative else seg_start[:, None] + r
    cos, sin = rope.cos_sin(q_pos, torch.float32)
    # the softmax scale on the queries (D columns) rather than on the scores (K columns): exact when it is a power of
    # two (1/8 for 64-wide heads), and one pass over a sixth of the data otherwise
    qp = apply_rope(qp.float(), cos, sin, rope.layout).mul_(scale)

    # window keys: segment i reads ext[(S - lead) + i*S : ... + W]
    need = (S - lead) + (nseg - 1) * S + W
    ext_k = F.pad(ext_k, (0, 0, 0, max(0, need - ext_k.shape[2])))[:, :, S - lead : need]
    ext_v = F.pad(ext_v, (0, 0, 0, max(0, need - ext_v.shape[2])))[:, :, S - lead : need]
    win_k = ext_k.unfold(2, W, S).transpose(-1, -2).float()  # (B, Hkv, nseg, W, D)
    win_v = ext_v.unfold(2, W, S).transpose(-1, -2).float()
    if relative:
        cos, sin = rope.cos_sin(S + c, torch.float32)
        win_k = apply_rope(win_k, cos, sin, rope.layout)
    token = seg_start[:, None, None] - W + S + c  # (nseg, 1, W)
    win_ok = (c <= W - S + r[:, None]) & (token >= max(Ns, 0))  # (nseg, S, W)

    sinks_k = sink_k.float()[:, :, None].expand(B, Hkv, nseg, Ns, D)
    if relative and Ns:
        i = torch.arange(Ns, device=device)
        sink_pos = torch.maximum(i - seg_start[:, None] + W, i - Ns)  # (nseg, Ns)
        cos, sin = rope.cos_sin(sink_pos, torch.float32)
        sinks_k = apply_rope(sinks_k, cos, sin, rope.layout)
    sink_ok = torch.arange(Ns, device=device) <= (seg_start[:, None, None] + r[:, None])  # (nseg, S, Ns)

    keys = torch.cat([sinks_k, win_k, bank_k.float()], dim=3)  # (B, Hkv, nseg, K, D)
    values = torch.cat([sink_v.float()[:, :, None].expand(B, Hkv, nseg, Ns, D), win_v, bank_v.float()], dim=3)
    mask = torch.cat([sink_ok, win_ok], dim=-1)  # (nseg, S, Ns + W)
    structural = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    bias = torch.cat(
        [
            structural.expand(B, Hkv, nseg, S, Ns + W),
            bank_bias[:, :, :, None, :].expand(B, Hkv, nseg, S, bank_bias.shape[-1]),
        ],
        dim=-1,
    )
    # Padding rows (before ``start`` or past the chunk) are discarded; give them finite
    # logits so that no softmax row is empty (an empty row's NaN would leak into gradients).
    if lead or nseg * S > n:
        t = seg_start[:, None] + r
        real = (t >= start) & (t < start + n)
        bias = torch.where(real[:, :, None], bias, 0.0)

    if nseg == 1 and n < S:
        # a decode step or a short chunk: score only its own query rows, not the padded segment
        # (rows are independent, so the outputs are the same; a step does 1/S of the work)
        rows = slice(lead, lead + n)
        scores = torch.einsum("bhqsd,bhkd->bhqsk", qp[:, :, :, 0, rows], keys[:, :, 0])
        probs = torch.softmax(scores + bias[:, :, None, 0, rows], dim=-1)
        return torch.einsum("bhqsk,bhkd->bhqsd", probs, values[:, :, 0]).to(q.dtype)

    per_segment = B * Hkv * Qs * S * keys.shape[3]
    group = max(1, _MAX_SCORE_ELEMENTS // max(per_segment, 1))
    K = keys.shape[3]
    # segments lead, then the query streams: each segment's rows are one matrix product with its
    # keys, and the scores come out in the layout the softmax and the second product read (the
    # einsum this replaces made the same products but permuted the scores in and out of them)
    by_segment = qp.permute(0, 1, 3, 2, 4, 5)  # (B, Hkv, nseg, Qs, S, D)
    blocks = []
    for g0 in range(0, nseg, group):
        sl = slice(g0, g0 + group)
        segment_rows = by_segment[:, :, sl].reshape(B, Hkv, -1, Qs * S, D)
        scores = torch.matmul(segment_rows, keys[:, :, sl].transpose(-1, -2))
        scores = scores.view(B, Hkv, -1, Qs, S, K).add_(bias[:, :, sl, None])
        probs = torch.softmax(scores, dim=-1).view(B, Hkv, -1, Qs * S, K)
        blocks.append(torch.matmul(probs, values[:, :, sl]))
    out = torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]  # (B, Hkv, nseg, Qs * S, D)
    out = out.view(B, Hkv, nseg, Qs, S, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, Qs, nseg * S, D)
    return out[:, :, :, lead : lead + n].to(q.dtype)
