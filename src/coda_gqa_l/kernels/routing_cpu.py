"""Bank routing for inference on the CPU: the decisions and values of ``routing_reference.route_chunk``, in fewer
operations.

On the CPU a chunk's routing is a chain of small tensor operations (16 segments per 1,024 tokens and layer, serial
by definition: each segment routes into the banks the previous one left), and their count, not their size, sets
its time. This path

* computes what does not depend on the banks once per chunk: the unit values, which tokens are summary candidates,
  which segments have an exact-bank candidate at all (one look at the gates instead of one per segment);
* once every summary prototype is seeded (a stream's state after its first few segments), leaves out the seeding
  and the masking of empty prototypes, which then change nothing;
* writes each segment's summary update straight into that segment's snapshot, and copies the exact bank into the
  snapshots once per run of segments it did not change, instead of concatenating and stacking per segment.

The same operations in the same order on the same values: outputs and states are bit-identical to the reference
(``tests/kernels/test_routing_cpu.py``). No gradients, metrics or routing observers: those run the reference, as do
banks in 16-bit floats (a bfloat16 model on the CPU), which the snapshots here do not hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BoundedConfig, chunk_segments
from ..state import Banks
from .routing_reference import _route_exact, _route_summary, route_chunk, routing_observed, summary_means


def route_chunk_inference(
    banks: Banks,
    ext_k: Tensor,
    ext_v: Tensor,
    ext_g: Tensor,
    *,
    start: int,
    n: int,
    eta: Tensor,
    config: BoundedConfig,
) -> tuple[Banks, Tensor, Tensor, Tensor]:
    """``routing_reference.route_chunk`` without metrics, for tensors that need no gradient (same arguments and
    results)."""
    W, S = config.window, config.segment
    segments = chunk_segments(start, n, S)
    float_banks = banks.ex_k.dtype == banks.sm_k.dtype == torch.float32
    if not len(segments) or not float_banks or routing_observed():
        return route_chunk(banks, ext_k, ext_v, ext_g, start=start, n=n, eta=eta, config=config)

    B, Hkv, _, D = ext_k.shape
    Me, Ms = banks.ex_k.shape[2], banks.sm_k.shape[2]
    nseg = len(segments)
    bank_k = ext_k.new_empty((B, Hkv, nseg, Me + Ms, D), dtype=torch.float32)
    bank_v = torch.empty_like(bank_k)
    gates = ext_g.new_empty((B, Hkv, nseg, Me + Ms), dtype=torch.float32)
    filled = torch.empty(gates.shape, dtype=torch.bool, device=gates.device)

    # what does not depend on the banks, for every token of the window and the chunk (token start - W + j)
    first_valid = max(config.num_sink, 0)
    token_all = torch.arange(start - W, start + n, device=ext_k.device)
    valid_all = token_all >= first_valid
    vn_all = F.normalize(ext_v.float(), dim=-1)
    summary_cand_all = valid_all & (ext_g > config.tau_summary)
    exact_cand_at = (valid_all & (ext_g > config.tau_exact)).flatten(0, 1).any(0).tolist() if Me else []
    rate = eta.view(1, -1, 1).float()
    summary = _SummaryUpdate(rate)
    all_seeded = Ms > 0 and bool(banks.sm_filled.all())

    ex_since = 0  # first snapshot of the exact bank as it stands now
    for i, seg_begin in enumerate(segments):
        first_evicted = seg_begin - W
        at = seg_begin - start
        updated_summary = False
        if seg_begin >= start and first_evicted + S > first_valid:
            k, v, g = ext_k[:, :, at : at + S], ext_v[:, :, at : at + S], ext_g[:, :, at : at + S]
            vn = vn_all[:, :, at : at + S]
            token_index = token_all[at : at + S]
            valid = valid_all[at : at + S].view(1, 1, -1).expand_as(g)
            cand_cos = None
            if Me and any(exact_cand_at[at : at + S]):
                cand_cos = vn @ vn.transpose(-1, -2)
                _fill(bank_k, bank_v, gates, filled, banks, ex_since, i)
                banks = _route_exact(banks, k, v, g, g, vn, cand_cos, token_index, valid, config, {}, None)
                ex_since = i
            if all_seeded:
                cand = summary_cand_all[:, :, at : at + S]
                banks = summary.write(banks, k, v, g, vn, cand, (bank_k, bank_v, gates), i)
                updated_summary = True
            elif Ms:
                if cand_cos is None:
                    cand_cos = vn @ vn.transpose(-1, -2)
                banks = _route_summary(banks, k, v, g, g, vn, cand_cos, valid, eta, config, {}, None)
                all_seeded = bool(banks.sm_filled.all())
        if Ms:
            filled[:, :, i, Me:] = banks.sm_filled
            if not updated_summary:
                bank_k[:, :, i, Me:] = banks.sm_k
                bank_v[:, :, i, Me:] = banks.sm_v
                gates[:, :, i, Me:] = banks.sm_g
    _fill(bank_k, bank_v, gates, filled, banks, ex_since, nseg)

    # the state keeps tensors of its own, not views into the chunk's snapshots
    banks = banks._replace(**{name: getattr(banks, name).clone() for name in ("sm_k", "sm_v", "sm_g")})
    # bank_view's logit offsets for all snapshots at once: log g, -inf where empty
    bias = torch.where(filled, torch.log(torch.where(filled, gates, 1.0)), float("-inf"))
    return banks, bank_k, bank_v, bias


def _fill(bank_k: Tensor, bank_v: Tensor, gates: Tensor, filled: Tensor, banks: Banks, first: int, end: int) -> None:
    """The exact bank's slots of snapshots ``first .. end - 1``, in which it did not change."""
    Me = banks.ex_k.shape[2]
    if end <= first or not Me:
        return
    bank_k[:, :, first:end, :Me] = banks.ex_k[:, :, None]
    bank_v[:, :, first:end, :Me] = banks.ex_v[:, :, None]
    gates[:, :, first:end, :Me] = banks.ex_g[:, :, None]
    filled[:, :, first:end, :Me] = banks.ex_filled[:, :, None]


class _SummaryUpdate:
    """``routing_reference._route_summary`` once every prototype is seeded: no seeding, no masking of empty
    prototypes (none are), each result written into its segment's snapshot. The EMA's ``1 - rate`` is computed
    once."""

    def __init__(self, rate: Tensor) -> None:
        self.rate, self.keep = rate, 1 - rate
        self.rate3, self.keep3 = rate[..., None], 1 - rate[..., None]

    def write(
        self, banks: Banks, k: Tensor, v: Tensor, g: Tensor, vn: Tensor, cand: Tensor, out: tuple[Tensor, ...], i: int
    ) -> Banks:
        bank_k, bank_v, gates = out
        Me = banks.ex_k.shape[2]
        full_cos = vn @ F.normalize(banks.sm_v.float(), dim=-1).transpose(-1, -2)
        best, assign = full_cos.max(-1)  # argmax and amax in one pass (the first maximum on ties, as argmax)
        member = cand & torch.isfinite(best)
        # one_hot(assign) * member, written as a scatter into zeros (the same values, in one small operation)
        onehot = full_cos.new_zeros(full_cos.shape).scatter_(-1, assign[..., None], member[..., None].float())
        updated, mean_k, mean_v, mean_g = summary_means(onehot, g, k, v)
        u3 = updated[..., None]
        sm_k, sm_v, sm_g = bank_k[:, :, i, Me:], bank_v[:, :, i, Me:], gates[:, :, i, Me:]
        torch.where(u3, self.keep3 * banks.sm_k + self.rate3 * mean_k, banks.sm_k, out=sm_k)
        torch.where(u3, self.keep3 * banks.sm_v + self.rate3 * mean_v, banks.sm_v, out=sm_v)
        torch.where(updated, self.keep * banks.sm_g + self.rate * mean_g, banks.sm_g, out=sm_g)
        return banks._replace(sm_k=sm_k, sm_v=sm_v, sm_g=sm_g)
