"""Training batches: packed language-model windows and, in phase 2, documents that teach the state
what to keep (docs/training.md):

* pass-key documents (``retrieval_fraction``): a numeric key far beyond the window;
* fact documents (``fact_fraction``, ``data/facts.py``): names, places, organisations, numbers,
  dates, colours, objects, phrases and codes stated once, early, and asked at the end in the
  neural database's own prompt layout; the answer tokens get the answer loss;
* plain windows, whose keep targets can come from the text itself (``recurring_keep``): tokens
  of capitalised words and numbers that occur again more than ``min_distance`` tokens later in
  the same window (a heuristic; no named-entity model is available here).

``keep_mask`` marks the write gate's keep targets: the tokens an answer copies (key digits, fact
values), and the recurring tokens above; every other token is taught to stay out of the bank."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .facts import FactSampler, make_fact_document
from .passkey import PasskeyDocument, make_document
from .prompts import PromptFormat

IGNORE = -100
FACT_COUNTS = (1, 1, 2, 3, 4, 6)  # facts per fact row, drawn uniformly; repeats weight a count
MAX_ASKED = 5  # questions after one fact row (the 5-fact evaluation asks all five)


@dataclass
class Batch:
    input_ids: Tensor  # (B, L)
    labels: Tensor  # (B, L): next-token targets already shifted left; IGNORE where not scored
    answer_mask: Tensor  # (B, L) bool: targets that are retrieval answers (weighted separately)
    keep_mask: Tensor  # (B, L) bool: the keys' tokens, which the write gate is taught to keep


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


class RecurringTokens:
    """Keep targets from plain text: tokens that spell a capitalised word or a number and recur far later.

    A token qualifies when its text holds a digit or starts (after spaces) with a capital letter,
    and it is not among the ``common`` most frequent such tokens of the training stream (sentence
    openers like " The"). Position ``i`` is a target when the same token occurs again at least
    ``min_distance`` tokens later in the row: the model will need it after it has left the window.
    """

    def __init__(self, stream: list[int], tokenizer: object, common: int = 200) -> None:
        decode = tokenizer.decode  # type: ignore[attr-defined]
        counts: dict[int, int] = {}
        for token in stream:
            counts[token] = counts.get(token, 0) + 1
        salient = {t for t in counts if _salient(decode([t]))}
        frequent = sorted(salient, key=lambda t: -counts[t])[:common]
        self.tokens = salient - set(frequent)

    def positions(self, ids: list[int], min_distance: int) -> list[int]:
        last: dict[int, int] = {}
        for i, token in enumerate(ids):
            if token in self.tokens:
                last[token] = i
        return [i for i, token in enumerate(ids) if token in self.tokens and last[token] - i >= min_distance]


def _salient(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and (any(c.isdigit() for c in stripped) or stripped[0].isupper())


def batches(
    stream: list[int],
    tokenizer: object,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    retrieval_fraction: float = 0.0,
    fact_fraction: float = 0.0,
    recurring_keep: bool = False,
    fact_counts: tuple[int, ...] = FACT_COUNTS,
    min_distance: int = 0,
    value_first_share: float | None = None,
    value_first_keep: str = "value",
) -> Iterator[Batch]:
    """Endless batches of random ``seq_len`` windows of ``stream``; a ``retrieval_fraction`` of the
    rows are passkey documents and a ``fact_fraction`` fact documents (training phrasings and
    values only), built on the same stream; see the module docstring for ``recurring_keep`` and
    ``facts.make_fact_document`` for ``value_first_keep``."""
    if len(stream) <= seq_len + 1:
        raise ValueError(f"the training text has {len(stream)} tokens, a sequence needs {seq_len + 1}")
    if retrieval_fraction < 0 or fact_fraction < 0 or retrieval_fraction + fact_fraction > 1:
        raise ValueError(f"need fractions >= 0 summing to at most 1, got {retrieval_fraction} and {fact_fraction}")
    if not fact_counts or min(fact_counts) < 1:
        raise ValueError(f"fact counts must be at least 1, got {list(fact_counts)}")
    rng = random.Random(seed)
    sampler = FactSampler("train", value_first_share) if fact_fraction > 0 else None
    layout = PromptFormat.for_tokenizer(tokenizer)
    recurring = RecurringTokens(stream, tokenizer) if recurring_keep else None
    while True:
        rows, labels, answers, keeps = [], [], [], []
        for _ in range(batch_size):
            keep = torch.zeros(seq_len, dtype=torch.bool)
            draw = rng.random()
            if draw < retrieval_fraction:
                doc = training_document(tokenizer, stream, rng, length=seq_len, min_distance=min_distance)
                ids = doc.ids
                answer = torch.zeros(len(ids), dtype=torch.bool)
                answer[doc.answer_start - 1 : len(ids) - 1] = True
                keep[doc.key_positions] = True
            elif sampler is not None and draw < retrieval_fraction + fact_fraction:
                ids, answer = _fact_row(tokenizer, layout, stream, rng, sampler, seq_len, min_distance, keep,
                                        fact_counts, value_first_keep)  # fmt: skip
            else:
                start = rng.randrange(len(stream) - seq_len - 1)
                ids = torch.tensor(stream[start : start + seq_len])
                answer = torch.zeros(seq_len, dtype=torch.bool)
                if recurring is not None:
                    keep[recurring.positions(ids.tolist(), min_distance)] = True
            rows.append(ids)
            labels.append(_shifted(ids))
            answers.append(answer)
            keeps.append(keep)
        yield Batch(torch.stack(rows), torch.stack(labels), torch.stack(answers), torch.stack(keeps))


def _fact_row(
    tokenizer: object,
    layout: PromptFormat,
    stream: list[int],
    rng: random.Random,
    sampler: FactSampler,
    seq_len: int,
    min_distance: int,
    keep: Tensor,
    counts: tuple[int, ...],
    value_first_keep: str = "value",
) -> tuple[Tensor, Tensor]:
    """A fact document of exactly ``seq_len`` tokens (a number of facts drawn from ``counts``, 1 to
    ``MAX_ASKED`` of them asked; fewer when they do not fit ``min_distance`` before the questions); sets ``keep``."""
    facts = rng.choice(counts)
    while True:
        try:
            doc = make_fact_document(tokenizer, layout, stream, rng, sampler=sampler, length=seq_len,
                                     num_facts=facts, num_asked=rng.randint(1, min(MAX_ASKED, facts)),
                                     min_distance=min_distance, value_first_keep=value_first_keep)  # fmt: skip
            break
        except ValueError:
            if facts == 1:
                raise
            facts -= 1
    keep[doc.keep_positions] = True
    return doc.ids, doc.answer_mask
