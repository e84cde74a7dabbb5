"""Passkey and needle documents: keys placed far before the question, answers scored as greedy output.

Training and evaluation use disjoint phrasings (``TRAIN_PHRASINGS`` never says "pass key";
evaluation always does) and disjoint haystacks (training: Wikipedia's train split; evaluation:
the essays), so a trained model cannot score by recognising its training template.

A trial is correct when greedy decoding after the question produces the key's tokens exactly;
teacher forcing over ``prompt + answer`` gives the same verdict in one forward pass (greedy
emits the answer iff each answer token is the argmax given the ones before it).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

# (statement with {name} and {key}, question with {name}) -- training only
TRAIN_PHRASINGS = (
    ("Keep this in mind: the access code for the {name} is {key}.", "What was the access code for the {name}? It is"),
    ("Important: the secret number of the {name} is {key}.", "Recall the secret number of the {name}. It is"),
    ("Note that the {name} uses the combination {key}.", "Which combination does the {name} use? It uses"),
)
# evaluation only
EVAL_PHRASINGS = (
    (
        "The pass key for the {name} is {key}. Remember it. {key} is the pass key for the {name}.",
        "What is the pass key for the {name}? The pass key for the {name} is",
    ),
)
TRAIN_NAMES = ("red door", "blue safe", "north gate", "old locker", "green box", "east tower")
EVAL_NAMES = ("archive", "vault", "cellar", "library", "garden shed", "boathouse")


@dataclass
class Needle:
    name: str
    key: str


@dataclass
class PasskeyDocument:
    ids: Tensor  # (L,) prompt followed by the answer tokens
    answer_start: int  # index of the first answer token in ``ids``
    needle_positions: list[int]  # token index where each needle statement starts
    asked: Needle
    key_positions: list[int] = field(default_factory=list)  # the keys' digit tokens, every needle


def _digit_offsets(tokenizer: object, piece: list[int]) -> list[int]:
    """Offsets in a needle statement of the tokens that spell its key: the only digits in it
    (names and phrasings have none), found by decoding so any tokenizer's split works."""
    decode = tokenizer.decode  # type: ignore[attr-defined]
    return [i for i, t in enumerate(piece) if any(c.isdigit() for c in decode([t]))]


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def make_document(
    tokenizer: object,
    filler: list[int],
    rng: random.Random,
    *,
    length: int,
    depth: float,
    num_keys: int = 1,
    split: str = "eval",
    min_distance: int = 0,
) -> PasskeyDocument:
    """A ``length``-token document: filler, ``num_keys`` needles around ``depth`` (0 = start, 1 = end
    of the filler), more filler, then the question about one of them and its answer.

    ``min_distance``: the asked needle ends at least this many tokens before the question (e.g.
    two windows), which caps how late it can sit; a ValueError says when ``length`` is too short.
    """
    phrasings, names = (EVAL_PHRASINGS, EVAL_NAMES) if split == "eval" else (TRAIN_PHRASINGS, TRAIN_NAMES)
    encode = tokenizer.encode  # type: ignore[attr-defined]
    statement, question = phrasings[rng.randrange(len(phrasings))]
    needles = [Needle(n, _key(rng)) for n in rng.sample(list(names), num_keys)]
    asked = needles[rng.randrange(num_keys)]
    pieces = [encode(" " + statement.format(name=n.name, key=n.key), add_special_tokens=False) for n in needles]
    q_ids = encode(" " + question.format(name=asked.name), add_special_tokens=False)
    a_ids = encode(" " + asked.key, add_special_tokens=False)
    hay = length - len(q_ids) - len(a_ids) - sum(len(p) for p in pieces)
    if hay <= 0:
        raise ValueError(f"length {length} leaves no room for the haystack")
    # needles spread after the depth point, the asked one at least min_distance before the question
    latest = hay - min_distance - len(pieces[needles.index(asked)])
    if latest < 0:
        raise ValueError(f"length {length} cannot put a needle {min_distance} tokens before the question")
    start = int(min(depth * hay, latest))
    offset = rng.randrange(max(1, len(filler) - hay))
    body = filler[offset : offset + hay]
    if len(body) < hay:
        raise ValueError(f"the haystack has {len(filler)} tokens, a document needs {hay}")
    ids: list[int] = []
    positions: list[int] = []
    key_positions: list[int] = []
    spread = max(1, (latest - start) // max(1, num_keys)) if num_keys > 1 else 0
    consumed = 0
    for i, piece in enumerate(pieces):
        point = min(start + i * spread, hay)
        ids += body[consumed:point]
        consumed = point
        positions.append(len(ids))
        key_positions += [len(ids) + offset for offset in _digit_offsets(tokenizer, piece)]
        ids += piece
    ids += body[consumed:]
    ids += q_ids
    answer_start = len(ids)
    ids += a_ids
    return PasskeyDocument(torch.tensor(ids), answer_start, positions, asked, key_positions)


def greedy_answer(logits: Tensor, doc: PasskeyDocument, offset: int = 0) -> Tensor:
    """Greedy decoding's answer tokens from teacher-forced logits of ``doc.ids``: row ``i`` of
    ``logits`` is position ``offset + i`` (``offset > 0`` when only the tail was kept)."""
    if doc.answer_start - 1 < offset:
        raise ValueError(f"the logits start at {offset}, after the question ends ({doc.answer_start - 1})")
    rows = slice(doc.answer_start - 1 - offset, len(doc.ids) - 1 - offset)
    return logits[rows].argmax(-1).to(doc.ids.device)


def answer_correct(logits: Tensor, doc: PasskeyDocument, offset: int = 0) -> bool:
    """Whether greedy decoding (``greedy_answer``) gives exactly the document's answer."""
    return bool(torch.equal(greedy_answer(logits, doc, offset), doc.ids[doc.answer_start :]))


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
