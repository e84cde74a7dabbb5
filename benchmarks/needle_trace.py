"""Where a passkey or a fact goes in a bounded model: the write gates of its tokens and of the others,
and whether it is still in each layer's exact bank when the question comes.

    PYTHONPATH=src python benchmarks/needle_trace.py [--weights FILE] [--length 4096] [--trials 2] [--out trace.json]
    PYTHONPATH=src python benchmarks/needle_trace.py --facts 5 [--length 4096] [--trials 2]
    PYTHONPATH=src python benchmarks/needle_trace.py --sample millbrook

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

``--facts N`` traces fact documents instead (evaluation-only patterns and values, ``N`` facts, all
asked; ``--kinds`` narrows them), and ``--sample harbour|millbrook`` the neural database's sample
documents with the demo's questions, read exactly as ``coda-db`` reads them. Each fact's value
tokens are a needle of their own: the trace answers every question from the state left by the
document (a fork per question, greedy, cut at the answer's stop, scored as coda-eval scores it)
and says where each missed fact was lost (``verdict``): ``gate`` (its tokens' gates stayed under
``tau_exact``), ``novelty test`` (they were refused as too similar to the bank or to their
segment), ``max_inserts``, ``evicted`` (written, then replaced by least-recently-used eviction
before the question) or ``read-out`` (still held in at least half the layers' banks, and the answer did
not copy it; ``tokens held`` says how many of its tokens some layer still holds). A fact held in
fewer layers gets the verdict of what kept it out of the others: the commonest fate of its
(token, KV head, layer) candidacies. Routing of the question's
own tokens is not traced.

``--force-gates value|after`` is an oracle for value-first facts (a statement that gives its value before saying
what it is): while the document is read, the write gates of their value tokens, or of their tokens after the value,
are 1 in every layer and KV head. Whether such a fact then comes back says whether keeping those tokens is enough
for the read-out (``coda-train --value-first-keep``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from coda_gqa_l.kernels.routing_reference import ExactRouting

FORCED = ("value", "after")  # --force-gates: which tokens of a value-first statement the oracle gate keeps
FORCED_LOGIT = 30.0  # sigmoid(30) is 1 in float32: the token is a candidate at every layer whatever tau_exact is
EARLY_LAYERS = 6  # SmolLM2's first six layers pass about 20x more ordinary tokens than the rest (results/facts.md)
FATES = ("below_tau", "hit_own_key", "hit_other", "similar_to_bank", "duplicate_in_segment", "cut_by_max_inserts",
         "written")  # fmt: skip


class ExactBankLedger:
    """What happens to the needles' tokens at each layer's exact bank, and which token each slot holds.

    The state records a slot's last use, which a hit moves to the hitting token; a slot's content
    changes only when a token is written there. The ledger observes every exact-bank routing
    (``kernels.routing_reference.observe_exact_routing``), keeps the
    writing token of every slot, and sorts each needle token's (KV head) candidacy into ``FATES``
    from the router's own tests (``routing_reference.exact_decisions``), per needle (``groups``: the token
    positions of each; a passkey is one needle, a fact document one per fact)."""

    def __init__(self, groups: Sequence[torch.Tensor], num_layers: int) -> None:
        self.groups = list(groups)
        self.keys = torch.cat(self.groups)
        self.layer = -1  # set by a forward pre-hook on each bounded layer
        self.origin: list[torch.Tensor | None] = [None] * num_layers
        self.needle_fates = [[dict.fromkeys(FATES, 0) for _ in self.groups] for _ in range(num_layers)]

    @property
    def fates(self) -> list[dict[str, int]]:
        """Every needle's fates summed, per layer."""
        return [{f: sum(d[f] for d in per_needle) for f in FATES} for per_needle in self.needle_fates]

    def observe(self, routing: ExactRouting) -> None:
        banks, new, gate, vn, cand_cos = routing.before, routing.after, routing.gate, routing.vn, routing.cand_cos
        token_index, valid, config = routing.token_index, routing.valid, routing.config
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

    def _sort(self, banks, origin, gate, vn, cand_cos, token_index, valid, config, new, written, is_key) -> None:
        from coda_gqa_l.kernels.routing_reference import exact_decisions

        cand, _, best_slot, best, hit, duplicate, novel = exact_decisions(banks, gate, vn, cand_cos, valid, config)
        similar = cand & ~hit & (best >= config.novelty)
        hit_key = hit & torch.isin(origin.gather(-1, best_slot), self.keys)
        stored = torch.isin(torch.where(written, new.ex_last, -1), token_index[is_key])  # (B, H, Me)
        stored_tokens = torch.zeros_like(cand)
        for b, h, slot in stored.nonzero().tolist():
            stored_tokens[b, h, int((token_index == new.ex_last[b, h, slot]).nonzero())] = True
        for group, tally in zip(self.groups, self.needle_fates[self.layer], strict=True):
            mask = (is_key & torch.isin(token_index, group)).view(1, 1, -1).expand_as(cand)
            if not mask.any():
                continue
            tally["below_tau"] += int((mask & ~cand).sum())
            tally["hit_own_key"] += int((mask & hit_key).sum())  # a hit on a slot some needle token wrote
            tally["hit_other"] += int((mask & hit & ~hit_key).sum())
            tally["similar_to_bank"] += int((mask & similar).sum())
            tally["duplicate_in_segment"] += int((mask & cand & ~hit & ~similar & duplicate).sum())
            tally["cut_by_max_inserts"] += int((mask & novel & ~stored_tokens).sum())
            tally["written"] += int((mask & stored_tokens).sum())


@contextlib.contextmanager
def ledger_installed(model: torch.nn.Module, groups: Sequence[torch.Tensor]) -> Iterator[ExactBankLedger]:
    """An ``ExactBankLedger`` of the needles ``groups`` that sees every exact-bank routing of ``model`` in the block."""
    from coda_gqa_l.kernels.routing_reference import observe_exact_routing
    from coda_gqa_l.models.adapters import CoDAAttentionAdapter

    # the adapter calls its layer's prefill_chunked, not the layer module, so the hooks sit on it
    adapters = [m for m in model.modules() if isinstance(m, CoDAAttentionAdapter) and m.bounded]
    ledger = ExactBankLedger(groups, len(adapters))
    hooks = [m.register_forward_pre_hook(functools.partial(lambda i, *_: setattr(ledger, "layer", i), m.layer_idx))
             for m in adapters]  # fmt: skip
    try:
        with observe_exact_routing(ledger.observe):
            yield ledger
    finally:
        for hook in hooks:
            hook.remove()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="CoDA weights file (default: the shipped one)")
    p.add_argument("--length", type=int, default=4096, help="tokens per document (default 4096)")
    p.add_argument("--depth", type=float, default=0.3, help="passkey: where the key sits (0 start, 1 end; default 0.3)")
    p.add_argument("--keys", type=int, default=1, help="passkey: needles per document, one asked (default 1)")
    p.add_argument("--facts", type=int, default=0, help="trace fact documents with this many facts, all asked "
                   "(default 0: passkey documents)")  # fmt: skip
    p.add_argument("--kinds", nargs="+", default=None, help="fact kinds to draw from (default: all ten)")
    p.add_argument("--sample", choices=("harbour", "millbrook"), default=None,
                   help="trace a neural database sample document and the demo's questions")  # fmt: skip
    p.add_argument("--trials", type=int, default=2, help="documents (default 2)")
    p.add_argument("--seed", type=int, default=1, help="document draws (default 1)")
    p.add_argument("--routing", nargs="*", default=[], metavar="NAME=VALUE",
                   help="bank-routing thresholds to read with instead of the file's (e.g. novelty=0.85)")  # fmt: skip
    p.add_argument("--force-gates", choices=FORCED, default=None,
                   help="fact mode, an oracle: while the document is read, the write gates of every value-first "
                   "statement's value tokens (value) or of its tokens after the value (after) are set to 1 in every "
                   "layer and KV head. Does the fact come back when the gate keeps those tokens?")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON file for every layer's figures")
    return p.parse_args(argv)


@contextlib.contextmanager
def forced_gates(model: torch.nn.Module, positions: Sequence[int]) -> Iterator[None]:
    """Set the write-gate logits of the document tokens at ``positions`` to ``FORCED_LOGIT`` in every bounded layer
    and KV head (an oracle gate), for a document read from its first token in order: each layer counts the tokens
    it has projected, so a chunk's positions are known. Forward hooks replace the gate's output: a hook installed
    after this one (``recorded_gate_logits``) sees the forced logits."""
    from coda_gqa_l.models.cache import bounded_modules

    wanted = torch.tensor(sorted(set(positions)), dtype=torch.long)
    hooks = []
    for module in bounded_modules(model):
        seen = [0]  # tokens this layer has projected so far
        width = module.num_kv_heads

        def force(_m: Any, _i: Any, out: torch.Tensor, seen: list[int] = seen, width: int = width) -> torch.Tensor:
            n = out.shape[1]
            local = wanted[(wanted >= seen[0]) & (wanted < seen[0] + n)] - seen[0]
            seen[0] += n
            if local.numel() == 0:
                return out
            out = out.clone()
            out[:, local.to(out.device), out.shape[-1] - width :] = FORCED_LOGIT
            return out

        target = module.input_projection if module.input_projection is not None else module.gate_proj
        hooks.append(target.register_forward_hook(force))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    from coda_gqa_l.config import parse_routing
    from coda_gqa_l.models.convert import retune_routing
    from coda_gqa_l.models.loader import load_model
    from coda_gqa_l.models.weights import apply_coda_weights

    if args.weights is None:
        from coda_gqa_l.models.pretrained import load_coda_smollm2

        model, tokenizer = load_coda_smollm2(progress=False)
    else:
        model, tokenizer = load_model("smollm2")
        apply_coda_weights(model, args.weights)
    if args.routing:
        retune_routing(model, **parse_routing(args.routing))
    return model.eval(), tokenizer


@dataclass
class TracedRead:
    """A document read through the bounded model with the ledger on: the cache it left, the LM
    logits (when asked for), one row per layer and, per needle, the pairs holding it at the end."""

    cache: Any
    logits: torch.Tensor | None
    layers: list[dict[str, Any]]
    needles: list[dict[str, Any]]


def read_traced(model: torch.nn.Module, ids: torch.Tensor, groups: Sequence[list[int]], *,
                logits: bool = False, chunk: int = 1024, watch: Sequence[list[int]] = ()) -> TracedRead:  # fmt: skip
    """Read ``ids`` (1D) in ``chunk``-token forwards, tracing the needles ``groups`` (token positions). ``watch``:
    more token groups whose gates are recorded per layer (``watch_gates``: mean, and the share of their (token, KV
    head) pairs above ``tau_exact``) without counting them as needles, so the other tokens' figures are unchanged."""
    from coda_gqa_l.models import BoundedCache
    from coda_gqa_l.models.cache import bounded_modules
    from coda_gqa_l.models.hf_compat import cache_kwargs
    from coda_gqa_l.training.gate_supervision import recorded_gate_logits

    config = bounded_modules(model)[0].config
    cache = BoundedCache(model, block_size=chunk)
    forward = model if logits else getattr(model, "model", model)  # the LM head only when its logits are used
    pieces, outputs = [], []
    tensors = [torch.tensor(g) for g in groups]
    with torch.no_grad(), recorded_gate_logits(model) as gate_logits, ledger_installed(model, tensors) as ledger:
        for start in range(0, len(ids), chunk):
            out = forward(ids[None, start : start + chunk], **cache_kwargs(cache), use_cache=True)
            if logits:
                outputs.append(out.logits[0])
            pieces.append(list(gate_logits))
            gate_logits.clear()
    is_key = torch.zeros(len(ids), dtype=torch.bool)
    is_key[ledger.keys] = True
    rows: list[dict[str, Any]] = []
    per_needle_held: list[list[int]] = []
    held_anywhere = torch.zeros(len(ids), dtype=torch.bool)
    for layer, state in enumerate(cache.states):
        assert state is not None
        gates = torch.sigmoid(torch.cat([p[layer][0] for p in pieces]).float())  # (L, Hkv)
        # what a slot holds is the token last written there (the ledger), not its last use
        origin = ledger.origin[layer]
        assert origin is not None
        holds = origin[0].masked_fill(~state.ex_filled[0], -1)  # (Hkv, Me)
        held_per_key_token = [int((holds == t).sum()) for t in ledger.keys.tolist()]
        per_needle_held.append([sum(int((holds == t).sum()) for t in g) for g in groups])
        held_anywhere[holds[holds >= 0]] = True
        oldest = origin[0].masked_fill(~state.ex_filled[0], len(ids)).min()
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
            "needle_gate_means": [float(gates[g].mean()) for g in tensors],
            "watch_gates": [
                (float(gates[w].mean()), float((gates[w] > config.tau_exact).float().mean())) if w else None
                for w in watch
            ],
        })  # fmt: skip
    needles = []
    for i, group in enumerate(groups):
        fates = {f: sum(ledger.needle_fates[layer][i][f] for layer in range(len(rows))) for f in FATES}
        held = [per_needle_held[layer][i] for layer in range(len(rows))]
        needles.append({"tokens": list(group), "fates": fates, "pairs_held": sum(held),
                        "tokens_held": int(held_anywhere[list(group)].sum()),
                        "layers_holding": sum(h > 0 for h in held), "layers": len(held),
                        "gate_mean": sum(r["needle_gate_means"][i] for r in rows) / len(rows)})  # fmt: skip
    return TracedRead(cache, torch.cat(outputs) if logits else None, rows, needles)


def verdict(needle: dict[str, Any], correct: bool) -> str:
    """Where a needle was lost, from its fates and what the bank holds at the question (module docstring)."""
    if correct:
        return "answered"
    # held in at least half the layers: the bank had it and the answer did not copy it; held in a
    # few layers only, what kept it out of the others is the loss
    layers = needle.get("layers", 0)
    if needle["pairs_held"] > 0 and 2 * needle.get("layers_holding", layers) >= layers:
        return "read-out"
    fates = needle["fates"]
    refused = {"gate": fates["below_tau"], "max_inserts": fates["cut_by_max_inserts"],
               "novelty test": fates["similar_to_bank"] + fates["duplicate_in_segment"] + fates["hit_other"]
               + fates["hit_own_key"]}  # fmt: skip
    # the commonest fate names the loss: a few written then evicted tokens do not outweigh hundreds of
    # candidacies the gate refused
    if fates["written"] > max(refused.values()):
        return "evicted"
    return max(refused, key=refused.__getitem__)


def trace(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Passkey documents (the module docstring)."""
    from coda_gqa_l.data import load_essays
    from coda_gqa_l.data.passkey import answer_correct, greedy_answer, make_document
    from coda_gqa_l.data.tokens import token_stream
    from coda_gqa_l.models.cache import bounded_modules

    model, tokenizer = _model(args)
    config = bounded_modules(model)[0].config
    haystack = token_stream([d.text for d in load_essays("all")], tokenizer)
    rng = random.Random(args.seed)
    trials = []
    for trial in range(args.trials):
        doc = make_document(tokenizer, haystack, rng, length=args.length, depth=args.depth, num_keys=args.keys,
                            split="eval", min_distance=2 * config.window)  # fmt: skip
        began = time.perf_counter()
        read = read_traced(model, doc.ids, [list(doc.key_positions)], logits=True)
        assert read.logits is not None
        # greedy decoding's answer beside the key: a wrong one shows whether digits were lost or
        # another number of the document was read out
        predicted = greedy_answer(read.logits, doc)
        trials.append({
            "trial": trial,
            "length": len(doc.ids),
            "key_tokens": doc.key_positions,
            "question_at": doc.answer_start,
            "correct": answer_correct(read.logits, doc),
            "expected": tokenizer.decode(doc.ids[doc.answer_start :].tolist()),
            "predicted": tokenizer.decode(predicted.tolist()),
            "seconds": time.perf_counter() - began,
            "tau_exact": config.tau_exact,
            "layers": read.layers,
        })  # fmt: skip
    return trials


@dataclass
class FactCase:
    """One document to trace in fact mode: its prompt tokens, and per fact the value, its kind, the
    question and the positions of the value's tokens in the prompt."""

    ids: torch.Tensor
    values: list[str]
    kinds: list[str]
    questions: list[str]
    positions: list[list[int]]
    others: list[Any]  # what answer_holds checks a wrong value against (the document's other facts)
    after: list[list[int]] = field(default_factory=list)  # a value-first statement's tokens after its value, or []


def _fact_cases(args: argparse.Namespace, tokenizer: Any, min_distance: int) -> list[FactCase]:
    from coda_gqa_l.data.facts import KINDS, FactSampler, heldout_fact_haystack, make_fact_document
    from coda_gqa_l.data.prompts import PromptFormat

    layout = PromptFormat.for_tokenizer(tokenizer)
    if args.sample is not None:
        return [_sample_case(args.sample, tokenizer, layout)]
    sampler, hay, rng = FactSampler("eval"), heldout_fact_haystack(tokenizer), random.Random(args.seed)
    cases = []
    for _ in range(args.trials):
        # keep targets after the value only mark value-first statements' tails: the document is the same either way
        doc = make_fact_document(tokenizer, layout, hay, rng, sampler=sampler, length=args.length,
                                 num_facts=args.facts, num_asked=args.facts, kinds=args.kinds or KINDS,
                                 depth_range=(0.1, 0.6), min_distance=min_distance,
                                 value_first_keep="after")  # fmt: skip
        prompt = doc.ids[: doc.prompt_end]
        positions = [_value_positions(prompt, tokenizer, f.value, near=p) for f, p in
                     zip(doc.facts, doc.fact_positions, strict=True)]  # fmt: skip
        order = [doc.facts.index(f) for f in doc.asked]
        bounds = [*doc.fact_positions[1:], doc.prompt_end]
        after = [[p for p in doc.keep_positions if start <= p < end] if fact.relation.value_first else []
                 for fact, start, end in zip(doc.facts, doc.fact_positions, bounds, strict=True)]  # fmt: skip
        cases.append(FactCase(prompt, [doc.facts[i].value for i in order], [doc.facts[i].relation.kind for i in order],
                              [doc.facts[i].question() for i in order], [positions[i] for i in order],
                              doc.facts, [after[i] for i in order]))  # fmt: skip
    return cases


def _value_positions(ids: torch.Tensor, tokenizer: Any, value: str, near: int = 0) -> list[int]:
    """The positions of the tokens that spell ``value`` in ``ids``, the first occurrence at or after ``near``."""
    text_so_far, starts = "", []
    for token in ids.tolist():
        starts.append(len(text_so_far))
        text_so_far += tokenizer.decode([token])
    at = text_so_far.find(value, starts[min(near, len(starts) - 1)])
    if at < 0:
        at = text_so_far.find(value)
    if at < 0:
        raise ValueError(f"{value!r} is not in the document")
    return [i for i, s in enumerate(starts) if s < at + len(value) and s + len(tokenizer.decode([ids[i]])) > at]


def _sample_case(name: str, tokenizer: Any, layout: Any) -> FactCase:
    from coda_gqa_l.neuraldb.demo import SAMPLES, sample_text

    filename, _, questions = SAMPLES[name]
    ids = torch.tensor(tokenizer.encode(layout.document_prefix + sample_text(filename), add_special_tokens=False))
    values = [expected for _, expected in questions]
    return FactCase(ids, values, ["sample"] * len(values), [q for q, _ in questions],
                    [_value_positions(ids, tokenizer, v) for v in values], [])  # fmt: skip


def trace_facts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fact documents or a sample document (the module docstring)."""
    from coda_gqa_l.data.facts import Fact, answer_holds, value_holds
    from coda_gqa_l.data.prompts import PromptFormat
    from coda_gqa_l.evaluation.fact_recall import generate_answers
    from coda_gqa_l.models.cache import bounded_modules

    model, tokenizer = _model(args)
    config = bounded_modules(model)[0].config
    layout = PromptFormat.for_tokenizer(tokenizer)
    trials = []
    for trial, case in enumerate(_fact_cases(args, tokenizer, 2 * config.window)):
        began = time.perf_counter()
        forced: list[int] = []
        if args.force_gates is not None:  # value-first facts only: ``case.after`` is empty for the others
            for value_tokens, after in zip(case.positions, case.after or [[]] * len(case.positions), strict=True):
                if after:
                    forced += value_tokens if args.force_gates == "value" else after
        with forced_gates(model, forced) if forced else contextlib.nullcontext():
            read = read_traced(model, case.ids, case.positions, watch=case.after)
        facts = []
        for i, (value, question) in enumerate(zip(case.values, case.questions, strict=True)):
            prompt = tokenizer.encode(layout.question.format(question=question), add_special_tokens=False)
            with torch.inference_mode():
                answer = generate_answers(model, read.cache.fork(), torch.tensor([prompt]), tokenizer, layout)[0]
            if case.others:
                asked = next(f for f in case.others if isinstance(f, Fact) and f.value == value)
                correct = answer_holds(answer, asked, case.others)
            else:
                correct = value_holds(answer, value)
            needle = read.needles[i]
            facts.append({"value": value, "kind": case.kinds[i], "question": question, "answer": answer,
                          "correct": correct, "verdict": verdict(needle, correct),
                          "distance": len(case.ids) - needle["tokens"][-1], **needle,
                          **_after_value_gates(read.layers, i)})  # fmt: skip
        trials.append({"trial": trial, "length": len(case.ids), "seconds": time.perf_counter() - began,
                       "tau_exact": config.tau_exact, "facts": facts, "layers": read.layers})  # fmt: skip
    return trials


def _after_value_gates(layers: list[dict[str, Any]], i: int) -> dict[str, Any]:
    """For a value-first fact: the mean gate of its value's tokens and of the statement's tokens after the value, in
    layers 6 on (``EARLY_LAYERS``), and the share of those (token, KV head) pairs above ``tau_exact``: whether the
    gate could tell the tokens after the value from ordinary ones (``coda-train --value-first-keep after``)."""
    watched = [row["watch_gates"][i] for row in layers[EARLY_LAYERS:] if row.get("watch_gates")]
    if not watched or any(w is None for w in watched):
        return {}
    late = layers[EARLY_LAYERS:]
    return {
        "late_value_gate": sum(row["needle_gate_means"][i] for row in late) / len(late),
        "late_after_gate": sum(w[0] for w in watched) / len(watched),
        "late_after_above_tau": sum(w[1] for w in watched) / len(watched),
        "late_other_gate": sum(row["other_gate_mean"] for row in late) / len(late),
    }


def render_facts(trial: dict[str, Any]) -> str:
    right = sum(f["correct"] for f in trial["facts"])
    lines = [
        f"trial {trial['trial']}: {trial['length']} tokens, {right} of {len(trial['facts'])} facts answered "
        f"({trial['seconds']:.0f} s; tau_exact {trial['tau_exact']})",
        "",
        "| value | kind | tokens back | answer | verdict | mean gate | written | below tau | novelty refused "
        "| cut | layers holding | tokens held |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in trial["facts"]:
        fates = f["fates"]
        refused = fates["similar_to_bank"] + fates["duplicate_in_segment"] + fates["hit_own_key"] + fates["hit_other"]
        layers, tokens = f"{f['layers_holding']} / {len(trial['layers'])}", f"{f['tokens_held']} / {len(f['tokens'])}"
        cells = [f["value"], f["kind"], f["distance"], repr(f["answer"]), f["verdict"], f"{f['gate_mean']:.3f}",
                 fates["written"], fates["below_tau"], refused, fates["cut_by_max_inserts"], layers,
                 tokens]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    first = [f for f in trial["facts"] if "late_after_gate" in f]
    if first:
        title = (
            f"value-first facts, layers {EARLY_LAYERS} on: mean gates of the value's tokens, of the statement's "
            "tokens after it, and of the other tokens; share of the after-tokens' pairs above tau_exact"
        )
        lines += ["", title, "",
                  "| value | kind | correct | value gate | after gate | other gate | after above tau |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for f in first:
            lines.append(
                f"| {f['value']} | {f['kind']} | {f['correct']} | {f['late_value_gate']:.4f} | "
                f"{f['late_after_gate']:.4f} | {f['late_other_gate']:.4f} | {f['late_after_above_tau']:.2%} |"
            )
    return "\n".join(lines)


def gate_load(layers: list[dict[str, Any]]) -> str:
    """The share of ordinary tokens whose gate passes tau_exact (exact-bank candidates), early layers and the rest:
    the figure that says whether training floods the exact bank."""
    early, late = layers[:EARLY_LAYERS], layers[EARLY_LAYERS:]

    def share(rows: list[dict[str, Any]]) -> str:
        return f"{100 * sum(r['other_above_tau'] for r in rows) / len(rows):.2f}%" if rows else "-"

    return f"ordinary tokens above tau_exact: layers 0-{EARLY_LAYERS - 1} {share(early)}, the rest {share(late)}"


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
        gate_load(trial["layers"]),
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
    facts = args.facts > 0 or args.sample is not None
    trials = trace_facts(args) if facts else trace(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"args": settings, "trials": trials}, indent=1))
    for trial in trials:
        print((render_facts(trial) if facts else render(trial)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
