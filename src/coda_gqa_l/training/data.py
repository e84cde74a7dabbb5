"""Training batches: packed language-model windows, and (phase 2) retrieval documents whose key
sits far beyond the window, so that the write gate learns what to keep (SPEC 5)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..evaluation.passkey import PasskeyDocument, make_document

IGNORE = -100


@dataclass
class Batch:
    input_ids: Tensor  # (B, L)
    labels: Tensor  # (B, L): next-token targets already shifted left; IGNORE where not scored
    answer_mask: Tensor  # (B, L) bool: targets that are retrieval answers (weighted separately)
    keep_mask: Tensor  # (B, L) bool: the keys' tokens, which the write gate is taught to keep


def token_stream(texts: list[str], tokenizer: object) -> list[int]:
    """All texts tokenized and joined with the end-of-sequence token between them."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        if eos is not None:
            ids.append(int(eos))
    return ids


def _shifted(ids: Tensor) -> Tensor:
    labels = torch.full_like(ids, IGNORE)
    labels[:-1] = ids[1:]
    return labels


def training_document(
    tokenizer: object, filler: list[int], rng: random.Random, *, length: int, min_distance: int
) -> PasskeyDocument:
    """A training-phrased retrieval document: 1 to 3 keys from depth 0 to 0.6 of the filler, the
    asked one at least ``min_distance`` tokens before its question. When several keys do not fit
    that distance, fewer are used; a ValueError says when not even one does."""
    depth, keys = rng.uniform(0.0, 0.6), rng.choice((1, 1, 2, 3))
    while True:
        try:
            return make_document(tokenizer, filler, rng, length=length, depth=depth, num_keys=keys,
                                 split="train", min_distance=min_distance)  # fmt: skip
        except ValueError:
            if keys == 1:
                raise
            keys -= 1


def batches(
    stream: list[int],
    tokenizer: object,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    retrieval_fraction: float = 0.0,
    min_distance: int = 0,
) -> Iterator[Batch]:
    """Endless batches of random ``seq_len`` windows of ``stream``; a ``retrieval_fraction`` of
    the rows are passkey documents (training phrasings) built on the same stream."""
    if len(stream) <= seq_len + 1:
        raise ValueError(f"the training text has {len(stream)} tokens, a sequence needs {seq_len + 1}")
    rng = random.Random(seed)
    while True:
        rows, labels, answers, keeps = [], [], [], []
        for _ in range(batch_size):
            keep = torch.zeros(seq_len, dtype=torch.bool)
            if rng.random() < retrieval_fraction:
                doc = training_document(tokenizer, stream, rng, length=seq_len, min_distance=min_distance)
                ids = doc.ids
                answer = torch.zeros(len(ids), dtype=torch.bool)
                answer[doc.answer_start - 1 : len(ids) - 1] = True
                keep[doc.key_positions] = True
            else:
                start = rng.randrange(len(stream) - seq_len - 1)
                ids = torch.tensor(stream[start : start + seq_len])
                answer = torch.zeros(seq_len, dtype=torch.bool)
            rows.append(ids)
            labels.append(_shifted(ids))
            answers.append(answer)
            keeps.append(keep)
        yield Batch(torch.stack(rows), torch.stack(labels), torch.stack(answers), torch.stack(keeps))
