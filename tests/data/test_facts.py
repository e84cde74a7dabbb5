"""Fact documents (data/facts.py): kinds, splits that never leak, keep targets from the answers' tokens."""

from __future__ import annotations

import random
import re

import pytest

from coda_gqa_l.data.facts import (
    KINDS,
    RELATIONS,
    Fact,
    FactSampler,
    Relation,
    answer_holds,
    make_fact_document,
    relations,
    value_lists,
)
from coda_gqa_l.data.prompts import PromptFormat
from coda_gqa_l.models.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
LAYOUT = PromptFormat.for_tokenizer(TOKENIZER)
FILLER = list(TOKENIZER.encode("The river runs past the old town and the fields beyond it. " * 400))


def test_at_least_a_hundred_patterns_over_every_kind_and_both_splits() -> None:
    assert len(RELATIONS) >= 100 and len(set(RELATIONS)) == len(RELATIONS)
    train, held_out = relations("train"), relations("eval")
    assert set(train).isdisjoint(held_out) and len(train) + len(held_out) == len(RELATIONS)
    for kind in KINDS:
        assert any(r.kind == kind for r in train) and any(r.kind == kind for r in held_out), kind
    for relation in RELATIONS:
        assert "{value}" in relation.statement and "{subject}" in relation.statement, relation
        assert "{value}" not in relation.question and relation.question.endswith("?"), relation


def test_evaluation_value_lists_never_reach_training() -> None:
    train, held_out = value_lists("train"), value_lists("eval")
    for name in train:
        if name == "company_suffix":  # a shared connective ("Ltd"), not a value by itself
            continue
        assert train[name] and held_out[name], name
        assert set(train[name]).isdisjoint(held_out[name]), name


def test_no_evaluation_pattern_or_value_in_training_documents() -> None:
    held_out = value_lists("eval")
    # each evaluation pattern's literal text between its placeholders (value-first patterns included)
    fragments = {f for r in relations("eval") for f in re.split(r"\{\w+\}", r.statement)}
    eval_statements = {f for f in fragments if not any(f in r.statement for r in relations("train"))}
    assert any(r.statement.startswith("{value}") for r in relations("eval"))
    sampler = FactSampler("train")
    rng = random.Random(0)
    for _ in range(200):
        doc = make_fact_document(TOKENIZER, LAYOUT, FILLER, rng, sampler=sampler, length=1500, num_facts=4, num_asked=2)
        for fact in doc.facts:
            assert fact.relation in sampler.relations
            words = fact.value.split()
            if fact.kind == "person":
                assert words[0] not in held_out["first"] and words[1] not in held_out["last"]
            if fact.kind in ("place", "colour", "object"):
                assert fact.value not in held_out[fact.kind]
            assert fact.subject not in held_out["subject"]
        text = TOKENIZER.decode(doc.ids.tolist())
        assert not any(s.strip() and s in text for s in eval_statements if len(s) > 25)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_keep_positions_spell_the_values_and_answers_are_scored(split: str) -> None:
    sampler = FactSampler(split)
    rng = random.Random(1)
    for _ in range(50):
        doc = make_fact_document(
            TOKENIZER, LAYOUT, FILLER, rng, sampler=sampler, length=2000, num_facts=3, num_asked=3, min_distance=500
        )
        ids = doc.ids.tolist()
        kept = TOKENIZER.decode([ids[i] for i in doc.keep_positions])
        shown = [f.split_statement()[1] for f in doc.facts]  # a value opening its sentence has a capital
        quoted = [f.relation.statement.count('"') > 0 for f in doc.facts]
        assert kept == "".join(v if q else f" {v}" for q, v in zip(quoted, shown, strict=True))
        assert [v.lower() for v in shown] == [f.value.lower() for f in doc.facts]
        assert abs(len(ids) - 2000) < 5
        for fact, (start, end) in zip(doc.asked, doc.answer_spans, strict=True):
            assert TOKENIZER.decode(ids[start:end]) == f" {fact.value}\n"
            assert bool(doc.answer_mask[start - 1 : end - 1].all())  # next-token positions of the answer
            assert start - max(doc.fact_positions) > 500  # every fact at least min_distance back
        assert int(doc.answer_mask.sum()) == sum(end - start for start, end in doc.answer_spans)


def test_value_first_patterns_in_both_splits_and_their_values_kept() -> None:
    """ "A brass astrolabe hangs above ...": the value before its relation, so the write gate must keep it
    with no cue before it; such patterns are trained and held out like the others."""
    for split in ("train", "eval"):
        first = [r for r in relations(split) if r.statement.index("{value}") < r.statement.index("{subject}")]
        assert len(first) >= (20 if split == "train" else 5), split
    relation = Relation("colour", "{value} is the colour of the lamps of {subject}.", "What colour?")
    fact = Fact(relation, "the mill", "teal")
    assert fact.split_statement() == ("", "Teal", " is the colour of the lamps of the mill.")
    sampler = FactSampler("train")
    sampler.by_kind = {**sampler.by_kind, "colour": (relation,)}
    doc = make_fact_document(TOKENIZER, LAYOUT, FILLER, random.Random(3), sampler=sampler, length=1200,
                             kinds=["colour"])  # fmt: skip
    ids = doc.ids.tolist()
    assert TOKENIZER.decode([ids[i] for i in doc.keep_positions]) == f" {doc.facts[0].value.capitalize()}"
    start = doc.fact_positions[0]
    assert TOKENIZER.decode(ids[start : doc.keep_positions[-1] + 1]) == f" {doc.facts[0].value.capitalize()}"


def test_value_first_keep_after_marks_what_follows_the_value_and_leaves_other_statements_alone() -> None:
    """``value_first_keep="after"``: a value-first statement's keep targets are its tokens after the value (they have
    read it), not the value; a statement with its subject first keeps its value as before."""
    first = Relation("colour", "{value} is the colour of the lamps of {subject}.", "What colour are the lamps?")
    last = Relation("colour", "The lamps of {subject} are painted {value}.", "What colour are the lamps?")
    for relation, expected in ((first, " is the colour of the lamps of the mill."), (last, None)):
        sampler = FactSampler("train")
        sampler.by_kind = {**sampler.by_kind, "colour": (relation,)}
        sampler.subject = lambda rng: "the mill"  # type: ignore[method-assign]
        kept = {}
        for mode in ("value", "after"):
            doc = make_fact_document(TOKENIZER, LAYOUT, FILLER, random.Random(3), sampler=sampler, length=1200,
                                     kinds=["colour"], value_first_keep=mode)  # fmt: skip
            ids = doc.ids.tolist()
            kept[mode] = TOKENIZER.decode([ids[i] for i in doc.keep_positions])
            value = doc.facts[0].value
        assert kept["value"] in (f" {value.capitalize()}", f" {value}")
        assert kept["after"] == (expected if expected is not None else kept["value"])
    with pytest.raises(ValueError, match="value_first_keep must be one of value, after"):
        make_fact_document(TOKENIZER, LAYOUT, FILLER, random.Random(3), sampler=FactSampler("train"), length=1200,
                           value_first_keep="before")  # fmt: skip


@pytest.mark.parametrize("share", [0.0, 0.1, 1.0])
def test_value_first_share_sets_how_often_a_fact_comes_value_first(share: float) -> None:
    """``FactSampler(value_first_share=p)``: a share p of the facts of kinds that have value-first patterns are
    stated value first (unset, patterns are drawn alike: 24 of the 112 training patterns are value-first)."""
    rng = random.Random(5)
    sampler = FactSampler("train", value_first_share=share)
    mixed = [k for k in KINDS if len({r.value_first for r in sampler.by_kind[k]}) == 2]
    assert mixed and sum(r.value_first for r in relations("train")) == 24
    drawn = []
    for _ in range(60):
        doc = make_fact_document(TOKENIZER, LAYOUT, FILLER, rng, sampler=sampler, length=1200, num_facts=3,
                                 num_asked=1, kinds=mixed)  # fmt: skip
        drawn += [fact.relation.value_first for fact in doc.facts]
    observed = sum(drawn) / len(drawn)
    assert abs(observed - share) < 0.06, (share, observed)
    with pytest.raises(ValueError, match="value_first_share"):
        FactSampler("train", value_first_share=1.5)


def test_the_no_fact_control_asks_about_facts_it_does_not_hold() -> None:
    rng = random.Random(2)
    doc = make_fact_document(
        TOKENIZER, LAYOUT, FILLER, rng, sampler=FactSampler("eval"), length=1200, num_facts=2, include_facts=False
    )
    text = TOKENIZER.decode(doc.ids.tolist())
    assert doc.keep_positions == [] and doc.asked[0].value not in text.split("Question:")[0]


def test_answers_are_scored_on_normalised_values_and_other_facts_refused() -> None:
    relation = Relation("person", "{subject} is run by {value}.", "Who runs {subject}?")
    wren, other = Fact(relation, "the station", "Tobias Wren"), Fact(relation, "the station", "Ilse Marrow")
    assert answer_holds("tobias wren.", wren, [other])
    assert answer_holds("The engineer is Tobias  Wren!", wren, [other])
    assert not answer_holds("Tobias", wren, [other])
    assert not answer_holds("Tobias Wren or Ilse Marrow", wren, [other])
    year = Fact(Relation("year", "{subject} began in {value}.", "When?"), "it", "1987")
    assert not answer_holds("19870", year) and answer_holds("in 1987.", year)


def _eight_grams(text: str) -> set[tuple[str, ...]]:
    from coda_gqa_l.data.facts import normalise

    words = normalise(text).split()
    return {tuple(words[i : i + 8]) for i in range(len(words) - 7)}


@pytest.mark.slow
def test_sample_documents_share_no_eight_gram_with_training_data() -> None:
    """The demo's documents test recall, not memory of the training data: no 8 words in a row in common with
    the fact patterns, the pass-key phrasings, or Wikipedia's train split (the phase-2 haystack)."""
    from coda_gqa_l.data import load_wikipedia
    from coda_gqa_l.data.passkey import TRAIN_PHRASINGS
    from coda_gqa_l.neuraldb.demo import SAMPLES, sample_text

    training = " \n ".join(
        [r.statement + " " + r.question for r in RELATIONS]
        + [s + " " + q for s, q in TRAIN_PHRASINGS]
        + [doc.text for doc in load_wikipedia("train")]
    )
    seen = set().union(*(_eight_grams(part) for part in training.split("\n")))
    for filename, _, questions in SAMPLES.values():
        text = sample_text(filename) + " ".join(q for q, _ in questions)
        shared = _eight_grams(text) & seen
        assert not shared, f"{filename} shares {sorted(shared)[:3]} with the training data"
