"""Where a passkey goes in a bounded model: the write gates of key and other tokens, and whether
the key is still in each layer's exact bank when the question comes.

    PYTHONPATH=src python benchmarks/needle_trace.py [--weights FILE] [--length 4096] [--trials 2] [--out trace.json]

Reads evaluation-phrased passkey documents (essays as the haystack, the key at least two windows
before the question) through the packaged SmolLM2 with CoDA weights (the shipped file unless
``--weights``), one document at a time, and prints per layer: the mean gate of the other tokens
and the share of them above ``tau_exact`` (each such token is an exact-bank candidate), the mean
gate of the key's tokens, how many of the key's (token, KV head) pairs the exact bank still holds
at the end, and the oldest token the bank still holds. A table per trial is printed last; the
JSON has every number. It runs on the CPU in float32 (about 10 s per 2K tokens on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="CoDA weights file (default: the shipped one)")
    p.add_argument("--length", type=int, default=4096, help="tokens per document")
    p.add_argument("--depth", type=float, default=0.3, help="where the key sits in the haystack (0 start, 1 end)")
    p.add_argument("--keys", type=int, default=1, help="needles per document (the question asks for one)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON file for every layer's figures")
    return p.parse_args(argv)


def trace(args: argparse.Namespace) -> list[dict[str, Any]]:
    from coda_gqa_l.data import load_essays
    from coda_gqa_l.evaluation.passkey import answer_correct, greedy_answer, make_document
    from coda_gqa_l.models import BoundedCache
    from coda_gqa_l.models.cache import bounded_modules
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
        with torch.no_grad(), recorded_gate_logits(model) as gate_logits:
            for start in range(0, len(doc.ids), 1024):
                chunk = doc.ids[None, start : start + 1024]
                logits.append(model(chunk, past_key_values=cache, use_cache=True).logits[0])
                pieces.append(list(gate_logits))
                gate_logits.clear()
        layers = len(pieces[0])
        keys = torch.tensor(doc.key_positions)
        is_key = torch.zeros(len(doc.ids), dtype=torch.bool)
        is_key[keys] = True
        rows = []
        for layer, state in enumerate(cache.states):
            assert state is not None
            gates = torch.sigmoid(torch.cat([p[layer][0] for p in pieces]).float())  # (L, Hkv)
            held = (torch.isin(state.ex_last[0], keys) & state.ex_filled[0]).sum()
            oldest = state.ex_last[0].masked_fill(~state.ex_filled[0], len(doc.ids)).min()
            rows.append({
                "layer": layer,
                "other_gate_mean": float(gates[~is_key].mean()),
                "other_above_tau": float((gates[~is_key] > config.tau_exact).float().mean()),
                "key_gate_mean": float(gates[is_key].mean()),
                "key_pairs_held": int(held),
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
