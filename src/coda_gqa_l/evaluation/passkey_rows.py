"""Pass-key retrieval cells of coda-eval: evaluation-phrased keys in essays, scored on greedy
output with 95% Wilson intervals (docs/evaluation.md).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from torch import nn

from ..data.passkey import answer_correct, make_document, wilson_interval
from ..models.cache import new_cache
from ..models.hf_compat import cache_kwargs
from .eval_config import EvalConfig


@torch.no_grad()
def passkey_rows(model: nn.Module, bounded: bool, tokenizer: Any, hay: list[int], args: EvalConfig,
                 window: int, deadline: float | None) -> list[dict]:  # fmt: skip
    """Pass-key cells (``args.keys`` x ``passkey_lengths`` x ``depths``, ``trials`` documents each, the
    evaluation phrasing, every key at least two windows before the question), greedy answers read
    teacher-forced; cells not begun by ``deadline`` are marked skipped."""
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
