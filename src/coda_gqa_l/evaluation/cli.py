"""``coda-eval``: perplexity through the state and passkey retrieval beyond the window (docs/evaluation.md).

Methods, each the same base model (the packaged SmolLM2 unless ``--model``):

- ``original``: the unconverted model with a full cache;
- ``window``: bounded plain GQA, recent window only (same slot count as the bounded config);
- ``streaming``: StreamingLLM, 4 sinks + window, positions re-assigned inside the cache
  (our relative position mode places the sinks just before the window);
- ``coda-unbounded`` / ``coda-bounded``: the CoDA weights file (``--weights``) converted
  unbounded (full cache) or bounded; without ``--weights`` the cold swap (untrained);
- ``gqa-unbounded`` / ``gqa-bounded``: the factorial's control, plain attention trained the same
  way (``coda-train --attention gqa``, ``--gqa-weights``), with a full cache or the same banks.

Perplexity scores the same tokens at every length (the held-out Wikipedia text and the King
James Bible, one long document, cut into windows of that length, each read as a stream through
the state, see ``perplexity_rows``); retrieval puts
evaluation-phrased keys into essays at least two windows before the question and scores
greedy output (teacher-forced, see ``passkey``), with 95% Wilson intervals. Writes
``OUT/eval.json``, ``OUT/eval.md``, ``OUT/perplexity.png`` and ``OUT/passkey.png``.

    coda-eval --weights runs/smollm2/coda.safetensors --out runs/eval
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..baseline import BaselineGQA, CoDAGQA
from ..cli_help import HelpFormatter, first_paragraph
from ..config import BoundedConfig, parse_routing
from ..cpu_threads import set_cpu_threads
from ..data import bible_text, load_essays, load_wikipedia
from ..data.facts import KINDS, heldout_fact_haystack
from ..data.passkey import answer_correct, make_document, wilson_interval
from ..data.tokens import token_stream
from ..models.adapters import CoDAAttentionAdapter
from ..models.cache import new_cache
from ..models.convert import convert, retune_routing, to_bounded
from ..models.hf_compat import cache_kwargs
from ..models.loader import load_model
from ..models.tiny import tiny_llama
from ..models.weights import apply_coda_weights, read_coda_meta
from .fact_recall import fact_rows
from .perplexity import stream_nll
from .report import write_report

METHODS = ("original", "window", "streaming", "coda-unbounded", "coda-bounded", "gqa-unbounded", "gqa-bounded")
DEFAULT_METHODS = METHODS[:5]
PERPLEXITY_TEXTS = ("wikipedia", "bible")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coda-eval", description=first_paragraph(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (packaged) or a Hugging Face model folder")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="CoDA weights file, coda-train's output (default: none, a cold swap of the original)",
    )
    p.add_argument("--config", default="medium", help="bounded preset of the cold swap and the slot count")
    p.add_argument("--num-sink", type=int, default=4, help="sinks taken out of the exact bank")
    gqa_help = (
        "weights of the factorial's plain-GQA arm (coda-train --attention gqa) for the gqa-* methods "
        "(default: none, a cold swap)"
    )
    p.add_argument("--gqa-weights", type=Path, default=None, help=gqa_help)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS, help="what to measure")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384], help="perplexity lengths")
    p.add_argument("--texts", nargs="+", default=["wikipedia", "bible"], choices=PERPLEXITY_TEXTS,
                   help="perplexity texts: held-out Wikipedia, and the KJV Bible as one long document")  # fmt: skip
    p.add_argument("--passkey-lengths", nargs="+", type=int, default=[4096, 16384], help="pass-key document lengths")
    p.add_argument(
        "--depths", nargs="+", type=float, default=[0.1, 0.5], help="where the key sits (share of the document)"
    )
    p.add_argument("--trials", type=int, default=50, help="passkey trials per cell (0: perplexity only)")
    p.add_argument("--keys", nargs="+", type=int, default=[1], help="needles per document (multi-key: 3)")
    fact_help = "fact-recall trials per kind and length (names, places, dates, ...; 0: none, the default)"
    p.add_argument("--fact-trials", type=int, default=0, help=fact_help)
    p.add_argument("--fact-lengths", nargs="+", type=int, default=[4096, 16384], help="fact document lengths")
    p.add_argument("--fact-kinds", nargs="+", default=list(KINDS), choices=KINDS, help="fact kinds (default all)")
    multi_help = "also documents holding this many facts, all asked (0: none; the issue's target uses 5)"
    p.add_argument("--fact-multi", type=int, default=0, help=multi_help)
    control_help = "no-fact control: the same questions on documents without the fact (what priors guess)"
    p.add_argument("--fact-control", action="store_true", help=control_help)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per forward when reading a stream")
    p.add_argument("--batch", type=int, default=10, help="passkey documents per forward")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    threads_help = "CPU threads when the device is the CPU (default $CODA_GQA_L_THREADS, else the cores not busy)"
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.add_argument("--seed", type=int, default=1234, help="seed of the documents, keys and facts")
    routing_help = "bank-routing thresholds for the coda-/gqa-bounded methods instead of the file's (e.g. novelty=0.85)"
    p.add_argument("--routing", nargs="+", default=[], metavar="NAME=VALUE", help=routing_help)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; cells not reached are marked skipped (default: none, no limit)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/coda-eval"), help="folder for eval.json, eval.md and the plots"
    )
    p.add_argument("--tiny-model", action="store_true", help="a small random Llama and byte text (tests)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_method(name: str, args: argparse.Namespace, base: Callable[[], nn.Module]) -> tuple[nn.Module, bool]:
    """The model of one method and whether it reads through a bounded state."""
    preset = BoundedConfig.preset(args.config, num_sink=args.num_sink)
    slots = preset.storage_slots
    model = base()
    if name == "original":
        return model, False
    if name == "window":  # every slot in the window
        return convert(model, plain_window(slots, 0)), True
    if name == "streaming":  # 4 sinks, the rest of the slots in the window
        return convert(model, plain_window(slots - 4, 4)), True
    differential, bounded = name.startswith("coda-"), name.endswith("-bounded")
    weights = args.weights if differential else args.gqa_weights
    if weights is None:  # the cold swap
        config = dataclasses.replace(preset, differential=differential) if bounded else None
        return convert(model, config, differential=differential), bounded
    meta = read_coda_meta(weights)
    if bool(meta["convert"].get("differential", True)) != differential:
        kind = "differential (CoDA)" if differential else "plain GQA"
        raise ValueError(f"{name} needs {kind} weights; {weights} holds the other kind (see coda-train --attention)")
    model = apply_coda_weights(model, weights)
    trained_bounded = bool(meta["convert"].get("bounded"))
    if not bounded and trained_bounded:
        # the trained core with a full cache (the write gate and EMA rate go unused)
        return _unbound(model), False
    if bounded and not trained_bounded:  # phase 1 only: the banks are new, as in a cold swap
        to_bounded(model, preset)
    return model, bounded


# The baselines' window advances 4 tokens at a time: it always shows 377 to 380 of StreamingLLM's
# 380 recent tokens (the real method shows exactly 380; segments of 64 would show 317 to 380, and
# a window rounded down to a multiple of 64 would waste storage).
BASELINE_SEGMENT = 4


def plain_window(window: int, sinks: int) -> BoundedConfig:
    """A baseline of ``sinks + window`` slots: plain attention over sinks and a recent window, no banks."""
    if window % BASELINE_SEGMENT:
        raise ValueError(f"a baseline window of {window} slots is not a multiple of {BASELINE_SEGMENT}")
    return BoundedConfig(window=window, num_landmarks_exact=0, num_landmarks_summary=0, num_sink=sinks,
                         segment=BASELINE_SEGMENT, differential=False)  # fmt: skip


def _unbound(model: nn.Module) -> nn.Module:
    """A bounded model's layers as unbounded attention with the same core (full cache): CoDA for a
    differential core, plain GQA for the factorial's control."""
    for adapter in (m for m in model.modules() if isinstance(m, CoDAAttentionAdapter)):
        core = adapter.layer.core  # type: ignore[union-attr]
        kind = CoDAGQA if core.differential else BaselineGQA
        layer = kind(core.embed_dim, core.num_heads, core.num_kv_heads, head_dim=core.head_dim)
        layer.core = core
        adapter.layer = layer.to(core.q_proj.weight.device, core.q_proj.weight.dtype)
    config: Any = model.config
    config.use_cache = True
    config.coda_gqa_l = dict(config.coda_gqa_l, bounded=None)
    return model


def perplexity_rows(
    model: nn.Module, bounded: bool, ids: torch.Tensor, args: argparse.Namespace, deadline: float | None = None
) -> list[dict]:
    """Perplexity of the same tokens at every context length: ``ids`` (the longest length) cut
    into windows of ``length`` tokens, each read from an empty state as a stream.

    Only positions that are predicted at every length are scored (every position but those at a
    multiple of the shortest length), so the lengths differ in context alone. Lengths not begun
    by ``deadline`` (``time.monotonic()``) are marked skipped.
    """
    total, shortest = ids.shape[1], min(args.lengths)
    scored = torch.arange(1, total) % shortest != 0
    rows: list[dict] = []
    for length in args.lengths:
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"length": length, "status": "skipped (time budget)"})
            continue
        began = time.perf_counter()
        pieces = []
        for start in range(0, total, length):
            window = ids[:, start : start + length]
            nll = stream_nll(model, window, new_cache(model, bounded, args.chunk), chunk=args.chunk)
            # position start + 1 + i of the text; the window's first token has no prediction
            pieces.append(torch.cat([nll.new_full((1,), math.nan), nll]) if start else nll)
        nll = torch.cat(pieces)[scored]
        rows.append({"length": length, "windows": total // length, "scored_tokens": int(nll.numel()),
                     "ppl": math.exp(nll.mean().item()), "seconds": time.perf_counter() - began})  # fmt: skip
    return rows


def check_lengths(lengths: list[int]) -> None:
    """Every length must divide the longest and be a multiple of the shortest (same tokens)."""
    longest, shortest = max(lengths), min(lengths)
    bad = [n for n in lengths if longest % n or n % shortest]
    if bad:
        raise ValueError(f"--lengths {bad} must divide the longest ({longest}) and be multiples of the shortest")


@torch.no_grad()
def passkey_rows(model: nn.Module, bounded: bool, tokenizer: Any, hay: list[int], args: argparse.Namespace,
                 window: int, deadline: float | None) -> list[dict]:  # fmt: skip
    device = next(model.parameters()).device
    rows: list[dict] = []
    if args.trials == 0:  # perplexity only
        return rows
    for keys in args.keys:
        for length in args.passkey_lengths:
            for depth in args.depths:
                if deadline is not None and time.monotonic() > deadline:
                    rows.append({"keys": keys, "length": length, "depth": depth, "status": "skipped (time budget)"})
                    continue
                rng = random.Random(hash((args.seed, keys, length, depth)) & 0xFFFFFFFF)
                docs = [
                    make_document(
                        tokenizer,
                        hay,
                        rng,
                        length=length,
                        depth=depth,
                        num_keys=keys,
                        split="eval",
                        min_distance=2 * window,
                    )  # fmt: skip
                    for _ in range(args.trials)
                ]
                correct = 0
                for start in range(0, len(docs), args.batch):
                    group = docs[start : start + args.batch]
                    ids = torch.stack([d.ids for d in group]).to(device)
                    first, logits = _teacher_forced(model, bounded, ids, args.chunk)
                    correct += sum(answer_correct(logits[i], d, offset=first) for i, d in enumerate(group))
                low, high = wilson_interval(correct, len(docs))
                distance = min(len(d.ids) - d.needle_positions[0] for d in docs)
                rows.append({"keys": keys, "length": length, "depth": depth, "status": "ok", "correct": correct,
                             "trials": len(docs), "accuracy": correct / len(docs), "ci95": [low, high],
                             "min_needle_distance": distance})  # fmt: skip
    return rows


def _teacher_forced(model: nn.Module, bounded: bool, ids: torch.Tensor, chunk: int) -> tuple[int, torch.Tensor]:
    """``(first, logits)``: the batch read as a stream in chunks; logits of positions ``first..``
    (the chunks that hold the question and answer; the rest are dropped as they go)."""
    cache = new_cache(model, bounded, chunk)
    tail = 64  # the question and answer sit in the last tokens; earlier logits are not needed
    out = []
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True).logits
        if start + chunk >= ids.shape[1] - tail:
            out.append((start, logits.float().cpu()))
    return out[0][0], torch.cat([logits for _, logits in out], dim=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    routing = parse_routing(args.routing)  # a bad threshold fails before any model is loaded
    began = time.monotonic()
    deadline = began + args.time_budget if args.time_budget else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        try:
            set_cpu_threads(args.threads)
        except ValueError as exc:
            raise SystemExit(f"coda-eval: {exc}") from None
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base, tokenizer = _base_loader(args, device, dtype)
    check_lengths(args.lengths)
    ppl_texts, hay = _texts(args, tokenizer)
    window = BoundedConfig.preset(args.config, num_sink=args.num_sink).window
    results: dict[str, Any] = {"meta": _meta(args, device, dtype), "perplexity": [], "passkey": [], "facts": []}
    fact_hay = _fact_haystack(args, tokenizer, hay) if args.fact_trials else []
    from tqdm import tqdm

    for name in tqdm(args.methods, desc="methods", unit="method"):
        model, bounded = build_method(name, args, base)
        if routing and name in ("coda-bounded", "gqa-bounded"):  # the baselines have no banks
            retune_routing(model, **routing)
        model.eval()
        for text, ids in ppl_texts.items():
            for row in perplexity_rows(model, bounded, ids, args, deadline):
                results["perplexity"].append({"method": name, "text": text, **row})
        for row in passkey_rows(model, bounded, tokenizer, hay, args, window, deadline):
            results["passkey"].append({"method": name, **row})
        for row in fact_recall_rows(model, bounded, tokenizer, fact_hay, args, window, deadline):
            results["facts"].append({"method": name, **row})
        del model
        # tables and plots after every method: a run stopped from outside keeps what it measured
        written = write_report(results, args.out)
    print("\n".join(str(p) for p in written))
    return 0


def _base_loader(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[], nn.Module], Any]:
    import copy

    if args.tiny_model:
        model, byte_tokenizer = tiny_llama()
        model.to(device=device, dtype=dtype)
        return (lambda: copy.deepcopy(model)), byte_tokenizer

    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # functools.wraps on PreTrainedModel.to
    return (lambda: copy.deepcopy(model)), tokenizer


def _texts(args: argparse.Namespace, tokenizer: Any) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The perplexity texts (the longest length's first tokens of each) and the haystack tokens."""
    longest = max(args.lengths)
    if args.tiny_model:
        rng = random.Random(0)
        words = "alpha beta gamma delta river stone cloud paper window garden".split()
        text = " ".join(rng.choice(words) for _ in range(max(args.lengths + args.passkey_lengths)))
        stream = token_stream([text], tokenizer)
        return {"tiny": torch.tensor([stream[:longest]])}, stream
    hay = token_stream([d.text for d in load_essays("all")], tokenizer)
    return perplexity_texts(args.texts, longest, tokenizer), hay


def perplexity_texts(names: Sequence[str], tokens: int, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The first ``tokens`` tokens ``(1, tokens)`` of each perplexity text (``wikipedia``: the held-out
    articles; ``bible``: the King James Bible as one document). Raises if a text is shorter."""
    sources = {
        "wikipedia": lambda: [d.text for d in load_wikipedia("heldout")],
        # a prefix is enough (a token is ~4 characters) and tokenizing all 4 MB takes a while
        "bible": lambda: [bible_text()[: 16 * tokens]],
    }
    texts = {}
    for name in names:
        if name not in sources:
            raise ValueError(f"unknown perplexity text {name!r}; choose from {sorted(sources)}")
        ids = token_stream(sources[name](), tokenizer)
        if len(ids) < tokens:
            raise ValueError(f"the {name} text has {len(ids)} tokens, fewer than asked ({tokens})")
        texts[name] = torch.tensor([ids[:tokens]])
    return texts


def fact_recall_rows(model: nn.Module, bounded: bool, tokenizer: Any, hay: list[int], args: argparse.Namespace,
                     window: int, deadline: float | None) -> list[dict]:  # fmt: skip
    """Fact recall (evaluation/fact_recall.py): single facts of every kind, the no-fact control, and
    documents of ``--fact-multi`` facts, each at least two windows before the question."""
    if args.fact_trials == 0:
        return []
    common = dict(lengths=args.fact_lengths, trials=args.fact_trials, min_distance=2 * window, seed=args.seed,
                  batch=args.batch, chunk=args.chunk, deadline=deadline)  # fmt: skip
    rows = fact_rows(model, bounded, tokenizer, hay, kinds=args.fact_kinds, **common)  # type: ignore[arg-type]
    if args.fact_control:
        rows += fact_rows(model, bounded, tokenizer, hay, kinds=args.fact_kinds, include_facts=False, **common)  # type: ignore[arg-type]
    if args.fact_multi > 1:
        rows += fact_rows(model, bounded, tokenizer, hay, kinds=args.fact_kinds, num_facts=args.fact_multi, **common)  # type: ignore[arg-type]
    return rows


def _fact_haystack(args: argparse.Namespace, tokenizer: Any, essays: list[int]) -> list[int]:
    """Held-out haystacks for fact documents: the essays (never trained on) and held-out Wikipedia."""
    if args.tiny_model:
        return essays

    return heldout_fact_haystack(tokenizer, essays)


def _meta(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import datetime

    return {
        "command": "coda-eval " + " ".join(_argv_of(args)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "weights": str(args.weights) if args.weights else None,
        "gqa_weights": str(args.gqa_weights) if args.gqa_weights else None,
        "config": args.config,
        "num_sink": args.num_sink,
        "routing": list(args.routing),
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def _argv_of(args: argparse.Namespace) -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    raise SystemExit(main())
