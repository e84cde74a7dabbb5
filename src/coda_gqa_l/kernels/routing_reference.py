"""Segment update of the exact and summary banks: the PyTorch reference (docs/semantics.md section 4).

``route_segment`` is called once per segment boundary with the ``S`` tokens that just left the
window, and returns the new banks; ``route_chunk`` runs every boundary of a prefill chunk and
keeps the bank snapshot each segment's queries see (``routing.py`` computes the same in one
Triton launch, ``routing_cpu.py`` in fewer operations for inference on the CPU). All decisions
are computed in float32 from detached scores and are deterministic by construction:

* candidate order: higher gate first, then lower token index;
* victim order: free slots first (by slot index), then least-recently-used (by last use, then
  slot index); a slot hit in this segment is never a victim in it;
* argmax ties go to the lower slot index (``torch.argmax`` returns the first maximum).

The values written (keys, values, gates, EMA means) keep their autograd history, so gradients
flow through bank writes in phase-2 training; the gate reaches the loss through the exact
bank's ``log g`` logit offset, the summary's gate EMA and its gate-weighted means.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BoundedConfig, chunk_segments
from ..state import Banks, merge_metrics

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ExactRouting:
    """One segment's exact-bank routing, as ``observe_exact_routing`` reports it: the banks
    ``before`` and ``after``, and the router's inputs (``gate`` and ``valid`` ``(B, Hkv, S)``,
    ``vn`` the unit values ``(B, Hkv, S, Dh)``, ``cand_cos`` their cosines, ``token_index`` ``(S,)``)."""

    before: Banks
    after: Banks
    gate: Tensor
    vn: Tensor
    cand_cos: Tensor
    token_index: Tensor
    valid: Tensor
    config: BoundedConfig


_exact_observers: list[Callable[[ExactRouting], None]] = []


@contextmanager
def observe_exact_routing(callback: Callable[[ExactRouting], None]) -> Iterator[None]:
    """Call ``callback`` with every exact-bank routing of the PyTorch reference inside the block
    (tools that explain where a token went: ``benchmarks/needle_trace.py``). The fused Triton
    router is not observed; run such tools on the reference path."""
    _exact_observers.append(callback)
    try:
        yield
    finally:
        _exact_observers.remove(callback)


def routing_observed() -> bool:
    """Whether a tool observes the exact bank's routing now (``observe_exact_routing``): shortcuts that would
    not report every segment then run the full reference."""
    return bool(_exact_observers)


class _Margin:
    """Smallest distance of any routing score from the value that would flip a decision.

    Chunk invariance holds decision for decision only when rounding (about 1e-6) cannot cross
    a threshold; tests read this from ``state.metrics['min_margin']`` to prove it could not.
    """

    def __init__(self) -> None:
        self.value = float("inf")

    def gap(self, a: Tensor, b: Tensor | float, where: Tensor) -> None:
        diff = (a - b).abs()
        diff = diff[where & torch.isfinite(diff)]
        if diff.numel():
            self.value = min(self.value, float(diff.min()))

    def runner_up(self, scores: Tensor, where: Tensor) -> None:
        """Gap between the best and second-best score along the last dim (finite only)."""
        if scores.shape[-1] < 2:
            return
        top2 = scores.topk(2, dim=-1).values
        self.gap(top2[..., 0], top2[..., 1], where)


@dataclass
class SummaryFill:
    """Whether every summary prototype is known to be seeded. Prototypes are never emptied, so once seeding finds
    none empty it has nothing left to do: later segments skip it without reading the fill back from the device."""

    full: bool = False


def _pairwise_higher(gate: Tensor, cand: Tensor) -> Tensor:
    """``higher[..., j, i]``: candidate ``i`` ranks above ``j`` (gate desc, then index asc)."""
    n = gate.shape[-1]
    gi, gj = gate[..., None, :], gate[..., :, None]
    idx = torch.arange(n, device=gate.device)
    earlier = idx[None, :] < idx[:, None]
    return cand[..., None, :] & ((gi > gj) | ((gi == gj) & earlier))


def route_segment(
    banks: Banks,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    token_index: Tensor,
    valid: Tensor,
    eta: Tensor,
    config: BoundedConfig,
    metrics: dict[str, float] | None = None,
    summary_fill: SummaryFill | None = None,
) -> Banks:
    """Route the tokens that left the window into the banks.

    Args:
        banks: the banks as they stood at the start of the segment.
        k, v: ``(B, Hkv, S, Dh)`` keys (as stored) and values of the evicted tokens.
        g: ``(B, Hkv, S)`` float32 write gates of those tokens.
        token_index: ``(S,)`` int64 token indices (for last use).
        valid: ``(S,)`` bool; False for slots that never held a routable token (sinks,
            positions before the stream started).
        eta: ``(Hkv,)`` EMA rates in (0, 1).
        config: thresholds and sizes.
        metrics: when given, counts are added to it (host synchronisation; off by default).
        summary_fill: what the caller knows of the summary bank's fill, kept up to date here (``route_chunk``
            passes one per chunk so that, once every prototype is seeded, seeding reads nothing back).
    """
    vn = F.normalize(v.detach().float(), dim=-1)
    gate = g.detach()
    cand_cos = vn @ vn.transpose(-1, -2)
    valid = valid.view(1, 1, -1).expand_as(gate)
    margin = _Margin() if metrics is not None else None
    counts: dict[str, float] = {}
    if banks.ex_k.shape[2] > 0 and not _no_exact_candidate(k, gate, valid, config, margin):
        before = banks
        banks = _route_exact(banks, k, v, g, gate, vn, cand_cos, token_index, valid, config, counts, margin)
        for observe in list(_exact_observers):
            observe(ExactRouting(before, banks, gate, vn, cand_cos, token_index, valid, config))
    if banks.sm_k.shape[2] > 0:
        banks = _route_summary(banks, k, v, g, gate, vn, cand_cos, valid, eta, config, counts, margin, summary_fill)
    if metrics is not None and margin is not None:
        candidate = valid & ((gate > config.tau_exact) | (gate > config.tau_summary))
        counts["evicted"] = float(valid.sum())
        counts["gated_out"] = float((valid & ~candidate).sum())
        counts["min_margin"] = margin.value
        merge_metrics(metrics, counts)
    return banks


def _no_exact_candidate(k: Tensor, gate: Tensor, valid: Tensor, config: BoundedConfig, margin: _Margin | None) -> bool:
    """On the CPU (where asking costs no device synchronisation): no evicted token passes ``tau_exact``, so the
    exact bank has nothing to refresh or insert and its routing is skipped. Most segments of a trained model are
    like this (its gate keeps well under 1% of tokens), and the skipped work is about a hundred small operations
    per layer and segment. Never with metrics or observers, which record every segment."""
    if not k.is_cpu or margin is not None or routing_observed():
        return False
    return not bool((valid & (gate > config.tau_exact)).any())


class ExactDecisions(NamedTuple):
    """The exact bank's per-candidate tests for one segment, all ``(B, Hkv, S)`` unless noted."""

    cand: Tensor  # evicted and gated above tau_exact
    bank_cos: Tensor  # (B, Hkv, S, Me) value cosine to each slot, -inf for empty slots
    best_slot: Tensor  # the most similar slot (the lower index on ties)
    best: Tensor  # its cosine
    hit: Tensor  # a candidate at least ``match`` to a slot: refreshes it
    duplicate: Tensor  # at least ``novelty`` to a higher-gated candidate of the segment
    novel: Tensor  # below ``novelty`` to the bank and to every higher-gated candidate: may be inserted


def exact_decisions(
    banks: Banks, gate: Tensor, vn: Tensor, cand_cos: Tensor, valid: Tensor, config: BoundedConfig
) -> ExactDecisions:
    """What the exact bank decides for each evicted token of a segment (``_route_exact`` acts on it)."""
    cand = valid & (gate > config.tau_exact)
    bank_cos = vn @ F.normalize(banks.ex_v.detach().float(), dim=-1).transpose(-1, -2)
    bank_cos = bank_cos.masked_fill(~banks.ex_filled[:, :, None, :], NEG_INF)
    best_slot = bank_cos.argmax(-1)
    best = bank_cos.gather(-1, best_slot[..., None]).squeeze(-1)
    hit = cand & (best >= config.match)
    duplicate = (_pairwise_higher(gate, cand) & (cand_cos >= config.novelty)).any(-1)
    novel = cand & (best < config.novelty) & ~duplicate
    return ExactDecisions(cand, bank_cos, best_slot, best, hit, duplicate, novel)


def _route_exact(
    banks: Banks,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    gate: Tensor,
    vn: Tensor,
    cand_cos: Tensor,
    token_index: Tensor,
    valid: Tensor,
    config: BoundedConfig,
    counts: dict[str, float],
    margin: _Margin | None,
) -> Banks:
    num_slots = banks.ex_k.shape[2]
    seg = k.shape[2]
    cand, bank_cos, best_slot, best, hit, _, novel = exact_decisions(banks, gate, vn, cand_cos, valid, config)

    # Hits refresh last use (to the latest hitting token) before any insert picks victims.
    slots = torch.arange(num_slots, device=k.device)
    hit_onehot = (best_slot[..., None] == slots) & hit[..., None]
    hit_last = torch.where(hit_onehot, token_index.view(1, 1, -1, 1), -1).amax(-2)
    slot_hit = hit_onehot.any(-2)
    ex_last = torch.where(slot_hit, torch.maximum(banks.ex_last, hit_last), banks.ex_last)

    # Victims: free slots, then LRU; hit slots excluded (ranked last and never reached).
    never = torch.iinfo(torch.int64).max
    victim_key = torch.where(banks.ex_filled, ex_last, -1).masked_fill(slot_hit, never)
    victims = victim_key.argsort(dim=-1, stable=True)
    slot_rank = victims.argsort(-1)
    order = torch.where(novel, gate, NEG_INF).argsort(dim=-1, descending=True, stable=True)
    inserts = torch.minimum(novel.sum(-1), (~slot_hit).sum(-1)).clamp(max=config.max_inserts)
    write = slot_rank < inserts[..., None]
    src = order.gather(-1, slot_rank.clamp(max=seg - 1))

    def take(x: Tensor) -> Tensor:
        return x.gather(2, src[..., None].expand(*src.shape, x.shape[-1]))

    w3 = write[..., None]
    new = banks._replace(
        ex_k=torch.where(w3, take(k).to(banks.ex_k.dtype), banks.ex_k),
        ex_v=torch.where(w3, take(v).to(banks.ex_v.dtype), banks.ex_v),
        ex_g=torch.where(write, g.gather(-1, src), banks.ex_g),
        ex_last=torch.where(write, token_index[src], ex_last),
        ex_filled=banks.ex_filled | write,
    )
    if margin is not None:
        margin.gap(gate, config.tau_exact, valid)
        margin.gap(best, config.match, cand)
        margin.gap(best, config.novelty, cand)
        other = ~torch.eye(seg, dtype=torch.bool, device=k.device)
        pair = cand[..., :, None] & cand[..., None, :] & other
        margin.gap(cand_cos, config.novelty, pair)
        # gate order decides among near-duplicates (which one is kept) and among inserts
        # (which slot each takes, and who is cut by max_inserts)
        ordered = pair & ((cand_cos >= config.novelty) | (novel[..., :, None] & novel[..., None, :]))
        margin.gap(gate[..., :, None], gate[..., None, :], ordered)
        margin.runner_up(bank_cos, hit)
        counts["exact_candidates"] = float(cand.sum())
        counts["exact_hits"] = float(hit.sum())
        counts["exact_novel"] = float(novel.sum())
        counts["exact_inserts"] = float(write.sum())
        counts["exact_overwrites"] = float((write & banks.ex_filled).sum())
    return new


def _route_summary(
    banks: Banks,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    gate: Tensor,
    vn: Tensor,
    cand_cos: Tensor,
    valid: Tensor,
    eta: Tensor,
    config: BoundedConfig,
    counts: dict[str, float],
    margin: _Margin | None,
    summary_fill: SummaryFill | None = None,
) -> Banks:
    cand = valid & (gate > config.tau_summary)
    proto_cos = vn @ F.normalize(banks.sm_v.detach().float(), dim=-1).transpose(-1, -2)
    proto_cos = proto_cos.masked_fill(~banks.sm_filled[:, :, None, :], NEG_INF)

    seed_src, seeded_cand = _pick_seeds(banks.sm_filled, cand, gate, proto_cos, cand_cos, margin, summary_fill)
    seeded = seed_src >= 0
    if seed_src.is_cpu and not bool(seeded.any()):  # (called only with summary slots: never empty)
        # every prototype already seeded (the usual case once a stream is a few segments in): the
        # seeding selections below would all pick the bank's own entries; the CPU skips them
        full_cos, base_k, base_v, base_g = proto_cos, banks.sm_k.float(), banks.sm_v.float(), banks.sm_g
    else:
        src = seed_src.clamp(min=0)
        # cosine of each candidate to each prototype after seeding
        seed_cos = cand_cos.gather(-1, src[:, :, None, :].expand(*cand_cos.shape[:3], src.shape[-1]))
        full_cos = torch.where(seeded[:, :, None, :], seed_cos, proto_cos)

        def take(x: Tensor) -> Tensor:
            return x.gather(2, src[..., None].expand(*src.shape, x.shape[-1]))

        s3 = seeded[..., None]
        base_k = torch.where(s3, take(k).float(), banks.sm_k.float())
        base_v = torch.where(s3, take(v).float(), banks.sm_v.float())
        base_g = torch.where(seeded, g.gather(-1, src), banks.sm_g)
    assign = full_cos.argmax(-1)
    member = cand & ~seeded_cand & torch.isfinite(full_cos.amax(-1))
    onehot = F.one_hot(assign, full_cos.shape[-1]).to(torch.float32) * member[..., None]

    updated, mean_k, mean_v, mean_g = summary_means(onehot, g, k, v)
    rate = eta.view(1, -1, 1).float()
    u3 = updated[..., None]
    rate3 = rate[..., None]
    new = banks._replace(
        sm_k=torch.where(u3, (1 - rate3) * base_k + rate3 * mean_k, base_k).to(banks.sm_k.dtype),
        sm_v=torch.where(u3, (1 - rate3) * base_v + rate3 * mean_v, base_v).to(banks.sm_v.dtype),
        sm_g=torch.where(updated, (1 - rate) * base_g + rate * mean_g, base_g),
        sm_filled=banks.sm_filled | seeded,
    )
    if margin is not None:
        margin.gap(gate, config.tau_summary, valid)
        margin.runner_up(full_cos, member)
        counts["summary_candidates"] = float(cand.sum())
        counts["summary_seeds"] = float(seeded.sum())
        counts["summary_updates"] = float(member.sum())
    return new


class SummaryMeans(NamedTuple):
    """What one segment's members move the prototypes towards, all ``(B, Hkv, Ms)`` unless noted."""

    updated: Tensor  # the prototype has members in this segment
    mean_k: Tensor  # (B, Hkv, Ms, Dh) gate-weighted mean of its members' keys
    mean_v: Tensor  # (B, Hkv, Ms, Dh) the same of their values
    mean_g: Tensor  # plain mean of their gates


def summary_means(onehot: Tensor, g: Tensor, k: Tensor, v: Tensor) -> SummaryMeans:
    """Means of each prototype's members, from ``onehot (B, Hkv, S, Ms)`` float32 membership and the tokens' gates,
    keys and values (``routing_cpu`` computes them with these same operations)."""
    weights = onehot * g[..., None]  # gate-weighted membership
    weight_sum = weights.sum(-2)
    count = onehot.sum(-2)
    denom = weight_sum.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    mean_k = weights.transpose(-1, -2) @ k.float() / denom
    mean_v = weights.transpose(-1, -2) @ v.float() / denom
    return SummaryMeans(count > 0, mean_k, mean_v, weight_sum / count.clamp_min(1))


def _pick_seeds(
    filled: Tensor,
    cand: Tensor,
    gate: Tensor,
    proto_cos: Tensor,
    cand_cos: Tensor,
    margin: _Margin | None,
    summary_fill: SummaryFill | None = None,
) -> tuple[Tensor, Tensor]:
    """Seed empty prototypes, farthest first.

    Each empty slot (lowest index first) takes the candidate whose highest cosine to every
    filled prototype (including those seeded just before it) is lowest; ties go to the higher
    gate, then the lower index. Returns ``seed_src (B, Hkv, Ms)`` (candidate index or -1) and
    the mask of candidates used as seeds.
    """
    seed_src = torch.full(filled.shape, -1, dtype=torch.int64, device=filled.device)
    available = cand.clone()
    if filled.shape[-1] == 0 or (summary_fill is not None and summary_fill.full):
        return seed_src, torch.zeros_like(cand)  # nothing to seed: what seeding would find, with nothing read back
    empty = ~filled
    empty_count = empty.sum(-1)
    rounds = torch.minimum(empty_count, cand.sum(-1))
    # one read back (a host synchronisation on a GPU; the fused kernel loops on the device instead): the rounds to
    # run, and whether any prototype is still empty after them (if none, the caller's later segments read nothing)
    num_rounds, still_empty = torch.stack([rounds.max(), (empty_count - rounds).max()]).tolist()
    if summary_fill is not None and still_empty == 0:
        summary_fill.full = True
    if num_rounds == 0:
        return seed_src, torch.zeros_like(cand)
    nearest = proto_cos.amax(-1)  # -inf when no prototype is filled
    for r in range(num_rounds):
        active = rounds > r
        key = torch.where(available, nearest, float("inf"))
        lowest = key.amin(-1, keepdim=True)
        tied = available & (key == lowest)
        tied_gate = torch.where(tied, gate, NEG_INF)
        pick = (tied & (tied_gate == tied_gate.amax(-1, keepdim=True))).int().argmax(-1)
        if margin is not None and key.shape[-1] > 1:
            # the pick is decided by the two lowest keys, or by the gates when keys tie at -inf
            two = key.topk(2, dim=-1, largest=False).values
            margin.gap(two[..., 0], two[..., 1], active)
            top_gates = tied_gate.topk(2, dim=-1).values
            margin.gap(top_gates[..., 0], top_gates[..., 1], active & torch.isinf(lowest.squeeze(-1)))
        slot = empty.int().argmax(-1)
        slot_onehot = F.one_hot(slot, filled.shape[-1]).bool() & active[..., None]
        seed_src = torch.where(slot_onehot, pick[..., None], seed_src)
        empty = empty & ~slot_onehot
        picked = F.one_hot(pick, cand.shape[-1]).bool() & active[..., None]
        available = available & ~picked
        picked_cos = cand_cos.gather(-1, pick[:, :, None, None].expand(*cand_cos.shape[:3], 1)).squeeze(-1)
        nearest = torch.where(active[..., None], torch.maximum(nearest, picked_cos), nearest)
    return seed_src, cand & ~available


def bank_view(banks: Banks) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, values and logit offsets of all bank slots: ``log g``, ``-inf`` when empty."""
    filled = torch.cat([banks.ex_filled, banks.sm_filled], dim=-1)
    gates = torch.cat([banks.ex_g, banks.sm_g], dim=-1)
    # log of 1 where empty keeps the gradient finite; the slot is masked right after
    bias = torch.where(filled, torch.log(torch.where(filled, gates, 1.0)), float("-inf"))
    return torch.cat([banks.ex_k, banks.sm_k], dim=2), torch.cat([banks.ex_v, banks.sm_v], dim=2), bias


_bank_view = bank_view  # the name the attention layer used before routing moved here


def route_chunk(
    banks: Banks,
    ext_k: Tensor,
    ext_v: Tensor,
    ext_g: Tensor,
    *,
    start: int,
    n: int,
    eta: Tensor,
    config: BoundedConfig,
    metrics: dict[str, float] | None = None,
) -> tuple[Banks, Tensor, Tensor, Tensor]:
    """Route every segment boundary of a chunk and keep the banks each segment's queries see.

    A segment's queries see the banks as they stood when its first token arrived, so routing
    runs only for segments that begin inside the chunk (``seg_begin >= start``) and only when
    one of the ``S`` tokens leaving the window is routable (not a sink, not before the stream).

    Args:
        banks: the banks before the chunk.
        ext_k, ext_v: ``(B, Hkv, W + n, Dh)`` the window's tokens in token order, then the chunk:
            tokens ``start - W .. start + n - 1``.
        ext_g: ``(B, Hkv, W + n)`` float32 write gates of those tokens.
        start, n: first token of the chunk and its length.
        eta, config, metrics: as for ``route_segment``.

    Returns:
        ``(banks, bank_k, bank_v, bank_bias)``: the banks after the chunk and, per segment of
        the chunk, the snapshot ``bank_view`` gives: ``(B, Hkv, nseg, Me + Ms, Dh)`` keys and
        values, ``(B, Hkv, nseg, Me + Ms)`` float32 logit offsets.
    """
    W, S = config.window, config.segment
    first_valid = max(config.num_sink, 0)
    snapshots: list[tuple[Tensor, Tensor, Tensor]] = []
    summary_fill = SummaryFill()
    for seg_begin in chunk_segments(start, n, S):
        first_evicted = seg_begin - W
        if seg_begin >= start and first_evicted + S > first_valid:
            token_index = torch.arange(first_evicted, first_evicted + S, device=ext_k.device)
            at = seg_begin - start
            banks = route_segment(
                banks,
                ext_k[:, :, at : at + S],
                ext_v[:, :, at : at + S],
                ext_g[:, :, at : at + S],
                token_index,
                token_index >= first_valid,
                eta,
                config,
                metrics,
                summary_fill=summary_fill,
            )
        snapshots.append(bank_view(banks))
    if not snapshots:  # an empty chunk touches no segment
        bank_k, bank_v, bank_bias = (part.unsqueeze(2)[:, :, :0] for part in bank_view(banks))
        return banks, bank_k, bank_v, bank_bias
    bank_k, bank_v, bank_bias = (torch.stack(parts, dim=2) for parts in zip(*snapshots, strict=True))
    return banks, bank_k, bank_v, bank_bias
