"""Retrieval in from-scratch runs: passkey documents mixed into training, and the passkey test.

Training documents use the training phrasings on the training text; the test uses the evaluation
phrasings on the essays (``data.passkey``), with the key at least two bounded windows
before the question, so a bounded model must carry it in its banks. Which rows become documents
and what they hold depend on (seed, update, row) only: every variant and every process count
trains on the same documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data.passkey import answer_correct, make_document, wilson_interval
from ..data.training_rows import training_document


@dataclass
class RetrievalSource:
    tokenizer: Any
    filler: list[int]  # training tokens, as a list (make_document slices it)
    fraction: float
    min_distance: int
    seed: int


def mix_retrieval(rows: Tensor, global_rows: list[int], step: int, source: RetrievalSource) -> Tensor:
    """``rows`` (B, T+1) with some replaced by passkey documents of the same length."""
    if source.fraction <= 0:
        return rows
    rows = rows.clone()
    length = rows.shape[1]
    for local, index in enumerate(global_rows):
        rng = random.Random(f"{source.seed}/{step}/{index}")
        if rng.random() >= source.fraction:
            continue
        doc = training_document(source.tokenizer, source.filler, rng, length=length, min_distance=source.min_distance)
        rows[local] = doc.ids
    return rows


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module,
    tokenizer: Any,
    hay: list[int],
    *,
    lengths: list[int],
    depths: list[float],
    trials: int,
    min_distance: int,
    batch: int,
    device: torch.device,
    seed: int = 1234,
) -> list[dict[str, Any]]:
    """Greedy-output passkey accuracy per (length, depth), teacher-forced, with a 95% interval."""
    was_training = model.training
    model.eval()
    rows = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"passkey/{seed}/{length}/{depth}")
            docs = [make_document(tokenizer, hay, rng, length=length, depth=depth, split="eval",
                                  min_distance=min_distance) for _ in range(trials)]  # fmt: skip
            correct = 0
            for start in range(0, trials, batch):
                group = docs[start : start + batch]
                ids = torch.stack([d.ids for d in group]).to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(input_ids=ids, use_cache=False).logits.float()
                correct += sum(answer_correct(logits[i], d) for i, d in enumerate(group))
            low, high = wilson_interval(correct, trials)
            distance = min(len(d.ids) - d.needle_positions[0] for d in docs)
            rows.append({"length": length, "depth": depth, "correct": correct, "trials": trials,
                         "accuracy": correct / trials, "ci95": [low, high],
                         "min_needle_distance": distance})  # fmt: skip
    model.train(was_training)
    return rows
