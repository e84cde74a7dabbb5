"""Where a passkey goes in a bounded model: the write gates of key and other tokens, and whether
the key is still in each layer's exact bank when the question comes.

    PYTHONPATH=src python benchmarks/needle_trace.py [--weights FILE] [--length 4096] [--trials 2] [--out trace.json]

Reads evaluation-phrased passkey documents (essays as the haystack, the key at least two windows
before the question) through the packaged SmolLM2 with CoDA weights (the shipped file unless
``--weights``), one document at a time, and prints per layer: the mean gate of the other tokens
and the share of them above ``tau_exact`` (each such token is an exact-bank candidate), the mean
gate of the key's tokens, how many of the key's (token, KV head) pairs the exact bank still holds
at the end, and the oldest token the bank still holds. Per trial it also sorts every key token's
candidacy at the exact bank by what the router decided (``FATES``: under the gate threshold, a hit
on a slot, too similar to the bank or to a higher-gated token of its segment, cut by
``max_inserts``, or written) and counts the pairs holding each key token at the question.
``--routing novelty=0.85 ...`` reads with other bank-routing thresholds. A table per trial is
printed last; the JSON has every number. It runs on the CPU in float32 (about 10 s per 2K tokens
on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FATES = ("below_tau", "hit_own_key", "hit_other", "similar_to_bank", "duplicate_in_segment", "cut_by_max_inserts",
         "written")  # fmt: skip


class ExactBankLedger:
    """What happens to the key's tokens at each layer's exact bank, and which token each slot holds.

    The state records a slot's last use, which a hit moves to the hitting token; a slot's content
    changes only when a token is written there. The ledger wraps ``banks._route_exact``, keeps the
    writing token of every slot, and sorts each key token's (KV head) candidacy into ``FATES``
    from the router's own tests (``banks.exact_decisions``)."""

    def __init__(self, keys: torch.Tensor, num_layers: int) -> None:
        self.keys = keys
        self.layer = -1  # set by a forward pre-hook on each bounded layer
        self.origin: list[torch.Tensor | None] = [None] * num_layers
        self.fates = [dict.fromkeys(FATES, 0) for _ in range(num_layers)]

    def route_exact(self, original, banks, k, v, g, gate, vn, cand_cos, token_index, valid, config, counts, margin):
        new = original(banks, k, v, g, gate, vn, cand_cos, token_index, valid, config, counts, margin)
        layer = self.layer
        origin = self.origin[layer]
        if origin is None:
            origin = torch.full_like(banks.ex_last, -1)
        # a write changes the slot's key; its last use is then the written token's index
        written = (new.ex_k != banks.ex_k).any(-1) | (new.ex_filled & ~banks.ex_filled)
        key_in_segment = torch.isin(token_index, self.keys) & valid[0, 0]  # valid comes expanded to (B, Hkv, S)
        if key_in_segment.any():
            self._sort(banks, origin, gate, vn, cand_cos, token_index, valid, config, new, written, key_in_segment)
        self.origin[layer] = torch.where(written, new.ex_last, origin)
        return new

    def _sort(self, banks, origin, gate, vn, cand_cos, token_index, valid, config, new, written, is_key) -> None:
        from coda_gqa_l.banks import exact_decisions

        cand, _, best_slot, best, hit, duplicate, novel = exact_decisions(banks, gate, vn, cand_cos, valid, config)
        similar = cand & ~hit & (best >= config.novelty)
        hit_key = hit & torch.isin(origin.gather(-1, best_slot), self.keys)
        stored = torch.isin(torch.where(written, new.ex_last, -1), token_index[is_key])  # (B, H, Me)
        stored_tokens = torch.zeros_like(cand)
        for b, h, slot in stored.nonzero().tolist():
            stored_tokens[b, h, int((token_index == new.ex_last[b, h, slot]).nonzero())] = True
        mask = is_key.view(1, 1, -1).expand_as(cand)
        tally = self.fates[self.layer]
        tally["below_tau"] += int((mask & ~cand).sum())
        tally["hit_own_key"] += int((mask & hit_key).sum())
        tally["hit_other"] += int((mask & hit & ~hit_key).sum())
        tally["similar_to_bank"] += int((mask & similar).sum())
        tally["duplicate_in_segment"] += int((mask & cand & ~hit & ~similar & duplicate).sum())
        tally["cut_by_max_inserts"] += int((mask & novel & ~stored_tokens).sum())
        tally["written"] += int((mask & stored_tokens).sum())


@contextlib.contextmanager
def ledger_installed(model: torch.nn.Module, keys: torch.Tensor) -> Iterator[ExactBankLedger]:
    """An ``ExactBankLedger`` that sees every exact-bank routing of ``model`` inside the block."""
    import coda_gqa_l.banks as banks_module
    from coda_gqa_l.models.adapters import CoDAAttentionAdapter

    # the adapter calls its layer's prefill_chunked, not the layer module, so the hooks sit on it
    adapters = [m for m in model.modules() if isinstance(m, CoDAAttentionAdapter) and m.bounded]
    ledger = ExactBankLedger(keys, len(adapters))
    original = banks_module._route_exact
    hooks = [m.register_forward_pre_hook(functools.partial(lambda i, *_: setattr(ledger, "layer", i), m.layer_idx))
             for m in adapters]  # fmt: skip
    banks_module._route_exact = functools.partial(ledger.route_exact, original)
    try:
        yield ledger
    finally:
        banks_module._route_exact = original
        for hook in hooks:
            hook.remove()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="CoDA weights file (default: the shipped one)")
    p.add_argument("--length", type=int, default=4096, help="tokens per document")
    p.add_argument("--depth", type=float, default=0.3, help="where the key sits in the haystack (0 start, 1 end)")
    p.add_argument("--keys", type=int, default=1, help="needles per document (the question asks for one)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--routing", nargs="*", default=[], metavar="NAME=VALUE",
                   help="bank-routing thresholds to read with instead of the file's (e.g. novelty=0.85)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON file for every layer's figures")
    return p.parse_args(argv)


def trace(args: argparse.Namespace) -> list[dict[str, Any]]:
    from coda_gqa_l.config import parse_routing
    from coda_gqa_l.data import load_essays
    from coda_gqa_l.evaluation.passkey import answer_correct, greedy_answer, make_document
    from coda_gqa_l.models import BoundedCache
    from coda_gqa_l.models.cache import bounded_modules
    from coda_gqa_l.models.convert import retune_routing
    from coda_gqa_l.models.hf_compat import cache_kwargs
    from coda_gqa_l.models.loader import load_model
    from coda_gqa_l.training.data import token_stream
    from coda_gqa_l.training.gate_supervision import recorded_gate_logits
    from coda_gqa_l.training.weights import apply_coda_weights

    if args.weights is None:
        from coda_gqa_l.pretrained import load_coda_smollm2

        model, tokenizer = load_coda_smollm2(progress=False)
    else:
        model, tokenizer = load_model("smollm2")
        apply_coda_weights(model, args.weights)
    if args.routing:
        retune_routing(model, **parse_routing(args.routing))
    model.eval()
    config = bounded_modules(model)[0].config
    haystack = token_stream([d.text for d in load_essays("all")], tokenizer)
    rng = random.Random(args.seed)
    trials = []
    for trial in range(args.trials):
        doc = make_document(tokenizer, haystack, rng, length=args.length, depth=args.depth, num_keys=args.keys,
                            split="eval", min_distance=2 * config.window)  # fmt: skip
        began = time.perf_counter()
        cache = BoundedCache(model, block_size=1024)
        pieces, logits = [], []
        keys = torch.tensor(doc.key_positions)
        with torch.no_grad(), recorded_gate_logits(model) as gate_logits, ledger_installed(model, keys) as ledger:
            for start in range(0, len(doc.ids), 1024):
                chunk = doc.ids[None, start : start + 1024]
                logits.append(model(chunk, **cache_kwargs(cache), use_cache=True).logits[0])
                pieces.append(list(gate_logits))
                gate_logits.clear()
        layers = len(pieces[0])
        is_key = torch.zeros(len(doc.ids), dtype=torch.bool)
        is_key[keys] = True
        rows = []
        for layer, state in enumerate(cache.states):
            assert state is not None
            gates = torch.sigmoid(torch.cat([p[layer][0] for p in pieces]).float())  # (L, Hkv)
            # what a slot holds is the token last written there (the ledger), not its last use
            origin = ledger.origin[layer]
            assert origin is not None
            holds = origin[0].masked_fill(~state.ex_filled[0], -1)  # (Hkv, Me)
            held_per_key_token = [int((holds == t).sum()) for t in doc.key_positions]
            oldest = origin[0].masked_fill(~state.ex_filled[0], len(doc.ids)).min()
            rows.append({
                "layer": layer,
                "other_gate_mean": float(gates[~is_key].mean()),
                "other_above_tau": float((gates[~is_key] > config.tau_exact).float().mean()),
                "key_gate_mean": float(gates[is_key].mean()),
                "key_pairs_held": sum(held_per_key_token),
                "held_per_key_token": held_per_key_token,
                "key_fates": ledger.fates[layer],
                "key_pairs": int(is_key.sum()) * gates.shape[1],
                "oldest_token_held": int(oldest),
            })  # fmt: skip
        assert len(rows) == layers
        # greedy decoding's answer beside the key: a wrong one shows whether digits were lost or
        # another number of the document was read out
        all_logits = torch.cat(logits)
        predicted = greedy_answer(all_logits, doc)
        trials.append({
            "trial": trial,
            "length": len(doc.ids),
            "key_tokens": doc.key_positions,
            "question_at": doc.answer_start,
            "correct": answer_correct(all_logits, doc),
            "expected": tokenizer.decode(doc.ids[doc.answer_start :].tolist()),
            "predicted": tokenizer.decode(predicted.tolist()),
            "seconds": time.perf_counter() - began,
            "tau_exact": config.tau_exact,
            "layers": rows,
        })  # fmt: skip
    return trials


def render(trial: dict[str, Any]) -> str:
    keys, tau = trial["key_tokens"], trial["tau_exact"]
    lines = [
        f"trial {trial['trial']}: {trial['length']} tokens, key tokens {keys[0]}..{keys[-1]}, question at "
        f"{trial['question_at']}, answered {'right' if trial['correct'] else 'wrong'} ({trial['seconds']:.0f} s): "
        f"expected {trial['expected']!r}, greedy {trial['predicted']!r}",
        "key tokens at the exact bank, all layers: "
        + ", ".join(f"{f} {sum(r['key_fates'][f] for r in trial['layers'])}" for f in FATES),
        "(layer, KV head) pairs holding each key token at the question: "
        + " ".join(str(sum(r["held_per_key_token"][i] for r in trial["layers"])) for i in range(len(keys))),
        "",
        f"| layer | other tokens: mean gate | share > tau ({tau}) | key tokens: mean gate | key pairs held "
        "| oldest held |",
        "|---|---|---|---|---|---|",
    ]
    for r in trial["layers"]:
        cells = [r["layer"], f"{r['other_gate_mean']:.3f}", f"{r['other_above_tau']:.3f}", f"{r['key_gate_mean']:.3f}",
                 f"{r['key_pairs_held']} / {r['key_pairs']}", r["oldest_token_held"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trials = trace(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"args": settings, "trials": trials}, indent=1))
    for trial in trials:
        print(render(trial) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
