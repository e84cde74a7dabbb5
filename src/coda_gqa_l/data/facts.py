"""Fact documents: facts of many kinds stated once, early, in natural sentences, and asked about at the end.

What the neural database must keep is not only pass-key digits: names, places, organisations,
numbers with units, dates, years, colours, objects, short phrases and codes. A ``FactDocument`` is
a haystack (real text) with one or more fact sentences placed at chosen depths, then the questions
(one or several, as a conversation) and their answers. Its ``keep_positions`` are the tokens the
answers copy out of the statements: the write gate's keep targets come from them, not from a rule
about digits.

Splits are fixed so that nothing evaluated is ever trained on:

* relation patterns: every fifth pattern of ``RELATIONS`` is evaluation-only;
* values: each value list is cut by a hash of the value (about one in five is evaluation-only),
  and composite values are made from parts of the same split (a held-out person has a held-out
  first name and a held-out last name), so an evaluation value never appears in training;
* haystacks: the callers pass the corpus split (training: Wikipedia's and the essays' train
  parts; evaluation: their held-out parts).

``tests/data/test_facts.py`` checks that no evaluation pattern or value reaches a training document.
Value lists come from Faker's providers (names, places, companies, catch phrases, colours) where
it has them; units, objects and subjects are short lists written here.

Usage::

    from coda_gqa_l.data.facts import FactSampler, make_fact_document

    sampler = FactSampler("train")
    doc = make_fact_document(tokenizer, layout, filler_ids, rng, sampler=sampler, length=2048,
                             num_facts=3, num_asked=2, min_distance=512)
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .corpora import load_essays, load_wikipedia
from .prompts import PromptFormat
from .tokens import token_stream

Split = Literal["train", "eval"]
KINDS = ("person", "place", "organisation", "number", "date", "year", "colour", "object", "phrase", "code")
EVAL_EVERY = 5  # every fifth relation pattern, and about one value in five, is evaluation-only


VALUE_FIRST_KEEP = ("value", "after")  # make_fact_document's keep targets in value-first statements


@dataclass(frozen=True)
class Relation:
    """One relation pattern: a statement and its question, about ``{subject}``, with the answer ``{value}``."""

    kind: str
    statement: str
    question: str

    @property
    def value_first(self) -> bool:
        """The statement gives the value before its subject ("A {value} hangs above the door of {subject}."):
        a causal write gate sees no cue before the value."""
        return self.statement.index("{value}") < self.statement.index("{subject}")


def _r(kind: str, statement: str, question: str) -> Relation:
    return Relation(kind, statement, question)


# fmt: off
RELATIONS: tuple[Relation, ...] = (
    # people
    _r("person", "The chief engineer of {subject} is {value}.", "Who is the chief engineer of {subject}?"),
    _r("person", "{subject} was founded by {value}.", "Who founded {subject}?"),
    _r("person", "The current director of {subject} is {value}.", "Who is the director of {subject}?"),
    _r("person", "Visitors to {subject} are usually met by the caretaker, {value}.", "Who is the caretaker of {subject}?"),
    _r("person", "The accounts of {subject} are kept by {value}.", "Who keeps the accounts of {subject}?"),
    _r("person", "The night watch at {subject} is led by {value}.", "Who leads the night watch at {subject}?"),
    _r("person", "{subject} was designed by the architect {value}.", "Which architect designed {subject}?"),
    _r("person", "The doctor who looks after the staff of {subject} is {value}.", "Who is the doctor of {subject}?"),
    _r("person", "The oldest member of {subject} is {value}.", "Who is the oldest member of {subject}?"),
    _r("person", "Every letter to {subject} should be addressed to {value}.", "To whom should letters to {subject} be addressed?"),
    _r("person", "The cook at {subject} is {value}.", "Who is the cook at {subject}?"),
    _r("person", "The first person to live at {subject} was {value}.", "Who was the first person to live at {subject}?"),
    _r("person", "{subject} is owned by {value}.", "Who owns {subject}?"),
    # places
    _r("place", "{subject} was first built in {value}.", "Where was {subject} first built?"),
    _r("place", "The head office of {subject} is in {value}.", "Where is the head office of {subject}?"),
    _r("place", "{subject} buys its timber from {value}.", "Where does {subject} buy its timber from?"),
    _r("place", "The founder of {subject} was born in {value}.", "Where was the founder of {subject} born?"),
    _r("place", "Each summer the staff of {subject} travel to {value}.", "Where do the staff of {subject} travel each summer?"),
    _r("place", "The archive of {subject} was moved to {value}.", "Where was the archive of {subject} moved to?"),
    _r("place", "{subject} has a sister branch in {value}.", "Where is the sister branch of {subject}?"),
    _r("place", "The nearest hospital to {subject} is in {value}.", "Where is the nearest hospital to {subject}?"),
    _r("place", "The bells of {subject} were cast in {value}.", "Where were the bells of {subject} cast?"),
    _r("place", "The old map of {subject} was printed in {value}.", "Where was the old map of {subject} printed?"),
    _r("place", "The spare parts for {subject} are shipped from {value}.", "Where are the spare parts for {subject} shipped from?"),
    _r("place", "{subject} sends its annual report to an office in {value}.", "Where does {subject} send its annual report?"),
    # organisations
    _r("organisation", "The roof of {subject} was repaired by {value}.", "Which company repaired the roof of {subject}?"),
    _r("organisation", "{subject} is insured with {value}.", "Which company insures {subject}?"),
    _r("organisation", "The electricity for {subject} is supplied by {value}.", "Which company supplies electricity to {subject}?"),
    _r("organisation", "{subject} rents its boats from {value}.", "From which company does {subject} rent its boats?"),
    _r("organisation", "The main sponsor of {subject} is {value}.", "Who is the main sponsor of {subject}?"),
    _r("organisation", "The computers of {subject} were sold to it by {value}.", "Which company sold the computers to {subject}?"),
    _r("organisation", "{subject} keeps its money at {value}.", "Where does {subject} keep its money?"),
    _r("organisation", "The cleaning at {subject} is done by {value}.", "Which company does the cleaning at {subject}?"),
    _r("organisation", "In its early years {subject} was run by {value}.", "Which company ran {subject} in its early years?"),
    _r("organisation", "The bread for {subject} is delivered by {value}.", "Which company delivers the bread for {subject}?"),
    _r("organisation", "The new wing of {subject} was built by {value}.", "Which company built the new wing of {subject}?"),
    _r("organisation", "{subject} buys its paint from {value}.", "From which company does {subject} buy its paint?"),
    # numbers with units
    _r("number", "The main hall of {subject} is {value} long.", "How long is the main hall of {subject}?"),
    _r("number", "The water tank of {subject} holds {value}.", "How much does the water tank of {subject} hold?"),
    _r("number", "The tower of {subject} rises to {value}.", "How tall is the tower of {subject}?"),
    _r("number", "The bell of {subject} weighs {value}.", "How much does the bell of {subject} weigh?"),
    _r("number", "The road to {subject} is {value} long.", "How long is the road to {subject}?"),
    _r("number", "The boiler of {subject} runs at {value}.", "At what setting does the boiler of {subject} run?"),
    _r("number", "Last winter {subject} burned {value} of fuel.", "How much fuel did {subject} burn last winter?"),
    _r("number", "The garden of {subject} covers {value}.", "How large is the garden of {subject}?"),
    _r("number", "The flagpole of {subject} is {value} high.", "How high is the flagpole of {subject}?"),
    _r("number", "The cable to {subject} carries {value}.", "What does the cable to {subject} carry?"),
    _r("number", "The gate of {subject} is {value} wide.", "How wide is the gate of {subject}?"),
    _r("number", "The storeroom of {subject} holds {value} of grain.", "How much grain does the storeroom of {subject} hold?"),
    # dates
    _r("date", "{subject} opened its doors on {value}.", "On what date did {subject} open?"),
    _r("date", "The great storm hit {subject} on {value}.", "On what date did the great storm hit {subject}?"),
    _r("date", "The lease of {subject} ends on {value}.", "On what date does the lease of {subject} end?"),
    _r("date", "The last inspection of {subject} took place on {value}.", "When was the last inspection of {subject}?"),
    _r("date", "The fire at {subject} broke out on {value}.", "On what date did the fire at {subject} break out?"),
    _r("date", "{subject} will hold its open day on {value}.", "When is the open day of {subject}?"),
    _r("date", "The new clock of {subject} was installed on {value}.", "When was the new clock of {subject} installed?"),
    _r("date", "The founder of {subject} died on {value}.", "On what date did the founder of {subject} die?"),
    _r("date", "The flood reached {subject} on {value}.", "On what date did the flood reach {subject}?"),
    _r("date", "The next meeting of the board of {subject} is on {value}.", "When is the next board meeting of {subject}?"),
    # years
    _r("year", "{subject} was founded in the year {value}.", "In which year was {subject} founded?"),
    _r("year", "The east wing of {subject} burned down in {value}.", "In which year did the east wing of {subject} burn down?"),
    _r("year", "{subject} got its first telephone in {value}.", "In which year did {subject} get its first telephone?"),
    _r("year", "The old bridge near {subject} collapsed in {value}.", "In which year did the bridge near {subject} collapse?"),
    _r("year", "{subject} closed for repairs in {value}.", "In which year did {subject} close for repairs?"),
    _r("year", "The lighthouse beside {subject} was lit for the last time in {value}.", "In which year was the lighthouse beside {subject} last lit?"),
    _r("year", "{subject} won its only prize in {value}.", "In which year did {subject} win its prize?"),
    _r("year", "The railway reached {subject} in {value}.", "In which year did the railway reach {subject}?"),
    _r("year", "{subject} was sold to new owners in {value}.", "In which year was {subject} sold?"),
    _r("year", "The first school lesson at {subject} was given in {value}.", "In which year was the first lesson given at {subject}?"),
    # colours
    _r("colour", "The front door of {subject} is painted {value}.", "What colour is the front door of {subject}?"),
    _r("colour", "The flag of {subject} is {value}.", "What colour is the flag of {subject}?"),
    _r("colour", "The delivery van of {subject} is {value}.", "What colour is the delivery van of {subject}?"),
    _r("colour", "The roof tiles of {subject} are {value}.", "What colour are the roof tiles of {subject}?"),
    _r("colour", "Staff at {subject} wear {value} uniforms.", "What colour are the uniforms at {subject}?"),
    _r("colour", "The benches in the garden of {subject} are {value}.", "What colour are the benches at {subject}?"),
    _r("colour", "The walls of the reading room of {subject} are {value}.", "What colour are the walls of the reading room of {subject}?"),
    _r("colour", "The rowing boat of {subject} is painted {value}.", "What colour is the rowing boat of {subject}?"),
    _r("colour", "The curtains of {subject} are {value}.", "What colour are the curtains of {subject}?"),
    _r("colour", "The sign above the gate of {subject} is {value}.", "What colour is the sign above the gate of {subject}?"),
    # objects
    _r("object", "The spare key of {subject} is hidden under the {value}.", "Where is the spare key of {subject} hidden?"),
    _r("object", "The most valuable thing at {subject} is an old {value}.", "What is the most valuable thing at {subject}?"),
    _r("object", "Above the fireplace of {subject} hangs a {value}.", "What hangs above the fireplace of {subject}?"),
    _r("object", "The first gift {subject} ever received was a {value}.", "What was the first gift {subject} received?"),
    _r("object", "In the entrance hall of {subject} stands a large {value}.", "What stands in the entrance hall of {subject}?"),
    _r("object", "The emblem of {subject} shows a {value}.", "What does the emblem of {subject} show?"),
    _r("object", "The time capsule of {subject} contains a {value}.", "What does the time capsule of {subject} contain?"),
    _r("object", "Every new member of {subject} is given a {value}.", "What is every new member of {subject} given?"),
    _r("object", "The prize for the yearly race at {subject} is a silver {value}.", "What is the prize for the race at {subject}?"),
    _r("object", "The oldest object in the museum of {subject} is a {value}.", "What is the oldest object in the museum of {subject}?"),
    # phrases
    _r("phrase", "The motto of {subject} is \"{value}\".", "What is the motto of {subject}?"),
    _r("phrase", "The password for the wireless network of {subject} is \"{value}\".", "What is the wireless password of {subject}?"),
    _r("phrase", "The annual plan of {subject} is called \"{value}\".", "What is the annual plan of {subject} called?"),
    _r("phrase", "The newsletter of {subject} is titled \"{value}\".", "What is the title of the newsletter of {subject}?"),
    _r("phrase", "The staff of {subject} answer the phone with \"{value}\".", "How do the staff of {subject} answer the phone?"),
    _r("phrase", "Over the door of {subject} are carved the words \"{value}\".", "What words are carved over the door of {subject}?"),
    _r("phrase", "The project that saved {subject} was named \"{value}\".", "What was the project that saved {subject} named?"),
    _r("phrase", "The slogan on the posters of {subject} reads \"{value}\".", "What slogan is on the posters of {subject}?"),
    _r("phrase", "The secret word at {subject} this month is \"{value}\".", "What is the secret word at {subject} this month?"),
    _r("phrase", "The closing song at {subject} is \"{value}\".", "What is the closing song at {subject}?"),
    # codes (what the pass key needs)
    _r("code", "The access code for the main door of {subject} is {value}.", "What is the access code for the main door of {subject}?"),
    _r("code", "The safe at {subject} opens with the combination {value}.", "Which combination opens the safe at {subject}?"),
    _r("code", "The membership number of {subject} is {value}.", "What is the membership number of {subject}?"),
    _r("code", "The alarm of {subject} is switched off with the code {value}.", "Which code switches off the alarm of {subject}?"),
    _r("code", "The registration number of {subject} is {value}.", "What is the registration number of {subject}?"),
    _r("code", "The locker of the caretaker of {subject} has the code {value}.", "What is the code of the caretaker's locker at {subject}?"),
    _r("code", "The phone extension of the office of {subject} is {value}.", "What is the phone extension of the office of {subject}?"),
    _r("code", "The parcel for {subject} has the tracking number {value}.", "What is the tracking number of the parcel for {subject}?"),
    _r("code", "The emergency code of {subject} is {value}.", "What is the emergency code of {subject}?"),
    _r("code", "The account number of {subject} ends in {value}.", "In what digits does the account number of {subject} end?"),
    # value first: the value comes before its relation, so a causal write gate sees no cue before it
    # ("A brass astrolabe hangs above ..."); appended so that the split of the patterns above is unchanged
    _r("person", "{value} is the chief gardener of {subject}.", "Who is the chief gardener of {subject}?"),
    _r("person", "{value} has run the ticket office of {subject} for years.", "Who runs the ticket office of {subject}?"),
    _r("person", "{value}, a retired teacher, now looks after the library of {subject}.", "Who looks after the library of {subject}?"),
    _r("place", "{value} is where the founder of {subject} went to school.", "Where did the founder of {subject} go to school?"),
    _r("place", "{value} is the town where {subject} keeps its spare boats.", "In which town does {subject} keep its spare boats?"),
    _r("place", "{value} was the birthplace of the first keeper of {subject}.", "Where was the first keeper of {subject} born?"),
    _r("organisation", "{value} prints the tickets for {subject}.", "Which company prints the tickets for {subject}?"),
    _r("organisation", "{value} has looked after the lifts of {subject} since it opened.", "Which company looks after the lifts of {subject}?"),
    _r("organisation", "{value} supplied the glass for the windows of {subject}.", "Which company supplied the glass for the windows of {subject}?"),
    _r("number", "{value} is the length of the pier at {subject}.", "How long is the pier at {subject}?"),
    _r("number", "{value} of coal are stored in the cellar of {subject}.", "How much coal is stored in the cellar of {subject}?"),
    _r("number", "{value} is what the anchor of {subject} weighs.", "How much does the anchor of {subject} weigh?"),
    _r("date", "{value} was the day the first train stopped at {subject}.", "On what date did the first train stop at {subject}?"),
    _r("date", "On {value} the roof of {subject} was finished.", "On what date was the roof of {subject} finished?"),
    _r("date", "{value} is the date on the foundation stone of {subject}.", "What date is on the foundation stone of {subject}?"),
    _r("year", "In {value} the garden of {subject} was first opened to the public.", "In which year was the garden of {subject} opened to the public?"),
    _r("year", "{value} was the year {subject} bought its first car.", "In which year did {subject} buy its first car?"),
    _r("year", "Since {value} the staff of {subject} have worn a badge.", "Since which year have the staff of {subject} worn a badge?"),
    _r("colour", "{value} is the colour of the lamps along the drive of {subject}.", "What colour are the lamps along the drive of {subject}?"),
    _r("colour", "Painted {value}, the boathouse of {subject} can be seen from the hill.", "What colour is the boathouse of {subject}?"),
    _r("colour", "Bright {value} paint covers the shutters of {subject}.", "What colour are the shutters of {subject}?"),
    _r("object", "A {value} hangs in the stairwell of {subject}.", "What hangs in the stairwell of {subject}?"),
    _r("object", "An old {value} stands beside the door of {subject}.", "What stands beside the door of {subject}?"),
    _r("object", "A {value} was the first thing bought for {subject}.", "What was the first thing bought for {subject}?"),
    _r("phrase", "\"{value}\" is the motto written over the gate of {subject}.", "What motto is written over the gate of {subject}?"),
    _r("phrase", "\"{value}\" is what the staff of {subject} call their yearly plan.", "What do the staff of {subject} call their yearly plan?"),
    _r("phrase", "\"{value}\" was painted on the side of the bus of {subject}.", "What was painted on the side of the bus of {subject}?"),
    _r("code", "{value} is the number of the key box at {subject}.", "What is the number of the key box at {subject}?"),
    _r("code", "{value} opens the side gate of {subject}.", "Which code opens the side gate of {subject}?"),
    _r("code", "{value} is the licence number of the boat of {subject}.", "What is the licence number of the boat of {subject}?"),
)
# fmt: on

# written here: Faker has no such lists
UNITS = ("metres", "kilograms", "litres", "kilometres", "tonnes", "hectares", "volts", "degrees", "centimetres",
         "feet", "gallons", "pounds", "miles", "amperes", "acres", "watts", "bar", "inches")  # fmt: skip
OBJECTS = ("brass compass", "clock", "telescope", "rocking chair", "flower pot", "stone lion", "barometer", "lantern",
           "violin", "globe", "ship in a bottle", "typewriter", "porcelain vase", "anchor", "sewing machine",
           "grandfather clock", "piano", "doormat", "wooden horse", "tea chest", "chessboard", "hourglass", "kettle",
           "brass bell", "oil painting", "harp", "rowing oar", "stuffed owl", "copper pan", "birdcage", "sundial",
           "music box", "iron key", "marble bust", "silk fan", "fishing net", "tin drum", "camera", "radio set",
           "weather vane", "spinning wheel", "bookcase", "umbrella stand", "candlestick", "saddle", "mirror",
           "sea chest", "red wheelbarrow", "ladder", "microscope")  # fmt: skip
SUBJECTS = ("the observatory", "the village library", "the ferry company", "the hill farm", "the river museum",
            "the weather station", "the harbour office", "the mountain hut", "the old mill", "the town theatre",
            "the fishing cooperative", "the botanical garden", "the radio station", "the boarding school",
            "the county archive", "the railway depot", "the chess club", "the sailing club", "the bakery",
            "the print shop", "the lighthouse trust", "the rowing club", "the glassworks", "the pottery",
            "the clinic", "the fire station", "the brewery", "the shipyard", "the choir", "the toy factory")  # fmt: skip
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip


def in_eval_split(value: str) -> bool:
    """Whether ``value`` belongs to the evaluation-only part of its list (a fixed hash, about one in five)."""
    return int(hashlib.sha256(value.encode("utf-8")).hexdigest(), 16) % EVAL_EVERY == 0


def split_list(values: Sequence[str], split: Split) -> tuple[str, ...]:
    """The part of ``values`` in ``split`` (sorted, duplicates removed)."""
    want = split == "eval"
    return tuple(sorted({v for v in values if in_eval_split(v) == want}))


def relations(split: Split) -> tuple[Relation, ...]:
    """The relation patterns of ``split``: every fifth of ``RELATIONS`` is evaluation-only."""
    want = split == "eval"
    return tuple(r for i, r in enumerate(RELATIONS) if (i % EVAL_EVERY == EVAL_EVERY - 1) == want)


def _words(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", camel).lower()


@functools.lru_cache(maxsize=2)
def value_lists(split: Split) -> dict[str, tuple[str, ...]]:
    """The word lists each kind's values are built from, for ``split`` (Faker's where it has them)."""
    from faker.providers.color import Provider as Colours
    from faker.providers.company.en_US import Provider as Companies
    from faker.providers.geo import Provider as Places
    from faker.providers.person.en_US import Provider as People

    # Faker's own lists: first names are a weighted dict in some versions, a tuple in others
    first = list(dict(People.first_names)) if isinstance(People.first_names, dict) else list(People.first_names)
    last = list(dict(People.last_names)) if isinstance(People.last_names, dict) else list(People.last_names)
    return {
        "first": split_list(first, split),
        "last": split_list(last, split),
        "place": split_list([p[2] for p in Places.land_coords if p[2].isascii() and len(p[2]) <= 20], split),
        "company_suffix": ("Group", "Ltd", "and Sons", "Holdings", "Brothers", "Company", "Works", "Partners"),
        **{
            f"catch_{i}": split_list([w.lower() for w in words], split)
            for i, words in enumerate(Companies.catch_phrase_words)
        },
        "colour": split_list([_words(c) for c in Colours.all_colors], split),
        "object": split_list(OBJECTS, split),
        "unit": split_list(UNITS, split),
        "subject": split_list(SUBJECTS, split),
    }


class FactSampler:
    """Draws fact values of every kind from one split's lists."""

    def __init__(self, split: Split, value_first_share: float | None = None) -> None:
        """``value_first_share``: the chance that a fact is stated value first (``Relation.value_first``)
        where its kind has such patterns; ``None`` draws every pattern of the kind alike."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if value_first_share is not None and not 0.0 <= value_first_share <= 1.0:
            raise ValueError(f"value_first_share must be in [0, 1], got {value_first_share}")
        self.split = split
        self.value_first_share = value_first_share
        self.lists = value_lists(split)
        self.relations = relations(split)
        self.by_kind = {kind: tuple(r for r in self.relations if r.kind == kind) for kind in KINDS}

    def value(self, kind: str, rng: random.Random) -> str:
        lists = self.lists
        if kind == "person":
            return f"{rng.choice(lists['first'])} {rng.choice(lists['last'])}"
        if kind == "place":
            return rng.choice(lists["place"])
        if kind == "organisation":
            return f"{rng.choice(lists['last'])} {rng.choice(lists['company_suffix'])}"
        if kind == "number":
            return f"{rng.randint(2, 999)} {rng.choice(lists['unit'])}"
        if kind == "date":
            return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1850, 2020)}"
        if kind == "year":
            return str(rng.randint(1700, 2020))
        if kind == "colour":
            return rng.choice(lists["colour"])
        if kind == "object":
            return rng.choice(lists["object"])
        if kind == "phrase":
            return " ".join(rng.choice(lists[f"catch_{i}"]) for i in range(3))
        if kind == "code":
            return str(rng.randint(10000, 99999)) if rng.random() < 0.5 else _letter_code(rng)
        raise ValueError(f"unknown fact kind {kind!r} (known: {', '.join(KINDS)})")

    def subject(self, rng: random.Random) -> str:
        return rng.choice(self.lists["subject"])


def _letter_code(rng: random.Random) -> str:
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
    return f"{letters}-{rng.randint(1000, 9999)}"


@dataclass(frozen=True)
class Fact:
    relation: Relation
    subject: str
    value: str

    @property
    def kind(self) -> str:
        return self.relation.kind

    def statement(self) -> str:
        text = self.relation.statement.format(subject=self.subject, value=self.value)
        return text[0].upper() + text[1:]

    def split_statement(self) -> tuple[str, str, str]:
        """The statement as (text before the value, the value as written, text after it): a value
        that opens the sentence is written with a capital ("Teal is the colour ...")."""
        text = self.statement()
        at = self.relation.statement.format(subject=self.subject, value="\0").index("\0")
        return text[:at], text[at : at + len(self.value)], text[at + len(self.value) :]

    def question(self) -> str:
        text = self.relation.question.format(subject=self.subject)
        return text[0].upper() + text[1:]


@dataclass
class FactDocument:
    """A document with facts, its questions and answers, as token ids.

    ``ids`` is the whole sequence: prompt prefix, haystack with the fact sentences, then each
    question followed by its answer and the end-of-answer marker. ``answer_mask[i]`` is True where
    token ``i + 1`` is part of an answer (the positions whose next-token loss trains the answer);
    ``keep_positions`` are the value tokens inside the fact statements (what the answers copy), or for value-first
    statements what follows the value (``make_fact_document``'s ``value_first_keep``).
    ``prompt_end`` is where the first question begins.
    """

    ids: Tensor
    answer_mask: Tensor
    keep_positions: list[int]
    facts: list[Fact]
    asked: list[Fact]
    fact_positions: list[int]
    prompt_end: int
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each answer's tokens


def answer_text(value: str) -> str:
    """What an answer says: the value alone (the model copies it from the state and stops)."""
    return value


def make_fact_document(
    tokenizer: object,
    layout: PromptFormat,
    filler: list[int],
    rng: random.Random,
    *,
    sampler: FactSampler,
    length: int,
    num_facts: int = 1,
    num_asked: int = 1,
    kinds: Sequence[str] | None = None,
    depth_range: tuple[float, float] = (0.0, 0.6),
    min_distance: int = 0,
    include_facts: bool = True,
    value_first_keep: str = "value",
) -> FactDocument:
    """A document of about ``length`` tokens: haystack with ``num_facts`` fact sentences (distinct
    relations, one subject) spread over ``depth_range`` of it, then ``num_asked`` of them asked.

    ``min_distance``: every asked fact ends at least this many tokens before the first question.
    ``include_facts=False`` leaves the fact sentences out (the no-fact control: the same questions
    about a document that does not hold the answer). A ValueError says when ``length`` is too short.
    ``value_first_keep``: the keep targets of a statement that gives its value first (``Relation.value_first``):
    ``"value"`` its value's tokens, as for every other statement; ``"after"`` the statement's tokens after the value
    instead. A causal write gate at the value has seen nothing that says a fact is coming, so a gate taught to keep
    such values learns to keep ordinary tokens (benchmarks/results/facts.md: the exact bank floods); the tokens after
    it have read the value and the statement's frame, and their values carry it.
    """
    if value_first_keep not in VALUE_FIRST_KEEP:
        raise ValueError(f"value_first_keep must be one of {', '.join(VALUE_FIRST_KEEP)}, got {value_first_keep!r}")
    encode = tokenizer.encode  # type: ignore[attr-defined]

    def tokens(text: str) -> list[int]:
        return list(encode(text, add_special_tokens=False))

    pool = [kind for kind in (kinds or KINDS) if sampler.by_kind.get(kind)]
    if not pool:
        raise ValueError(f"no relation of kinds {list(kinds or KINDS)} in the {sampler.split} split")
    subject = sampler.subject(rng)
    chosen: list[Relation] = []
    for _ in range(num_facts):
        kind = rng.choice(pool)
        options = [r for r in sampler.by_kind[kind] if r not in chosen] or [
            r for r in sampler.relations if r not in chosen and r.kind in pool
        ]
        if not options:
            break
        if sampler.value_first_share is not None:  # the share asked for, where the kind has both orders
            first = rng.random() < sampler.value_first_share
            options = [r for r in options if r.value_first == first] or options
        chosen.append(rng.choice(options))
    values: set[str] = set()
    facts: list[Fact] = []
    for relation in chosen:
        value = sampler.value(relation.kind, rng)
        while value in values:
            value = sampler.value(relation.kind, rng)
        values.add(value)
        facts.append(Fact(relation, subject, value))
    asked = rng.sample(facts, min(num_asked, len(facts)))

    # fact sentences: the statement split around its value, so the value's tokens are known exactly
    pieces: list[tuple[list[int], int, int]] = []  # (tokens, keep start, keep end): the value, or what follows it
    for fact in facts:
        before, shown, after = fact.split_statement()
        head, value_ids, tail = tokens(" " + before.rstrip(" ")), tokens(" " + shown), tokens(after)
        if before.endswith('"'):  # a quoted phrase: no space between the quote and the value
            head, value_ids = tokens(" " + before), tokens(shown)
        elif not before:  # the value opens the sentence
            head = []
        piece = head + value_ids + tail
        if value_first_keep == "after" and fact.relation.value_first and tail:
            pieces.append((piece, len(head) + len(value_ids), len(piece)))
        else:
            pieces.append((piece, len(head), len(head) + len(value_ids)))
    prefix = tokens(layout.document_prefix)
    end_marker = tokens(layout.end_of_answer)
    turns: list[tuple[list[int], list[int]]] = []  # (question tokens, answer tokens with the end marker)
    for i, fact in enumerate(asked):
        # a follow-up opens with the end marker that closes the previous answer: it is scored with that answer
        template = layout.question if i == 0 else layout.follow_up.removeprefix(layout.end_of_answer)
        answer = tokens(layout.answer_prefix + answer_text(fact.value)) + end_marker
        turns.append((tokens(template.format(question=fact.question())), answer))
    tail_len = sum(len(q) + len(a) for q, a in turns)
    fact_len = sum(len(p[0]) for p in pieces) if include_facts else 0
    hay = length - len(prefix) - tail_len - fact_len
    if hay <= 0:
        raise ValueError(f"length {length} leaves no room for the haystack")
    latest = hay - min_distance
    if latest < 0:
        raise ValueError(f"length {length} cannot put {len(facts)} facts {min_distance} tokens before the question")
    if len(filler) <= hay:
        raise ValueError(f"the haystack has {len(filler)} tokens, a document needs {hay}")
    offset = rng.randrange(len(filler) - hay)
    body = filler[offset : offset + hay]
    lo, hi = depth_range
    decode = tokenizer.decode  # type: ignore[attr-defined]
    points = sorted(_sentence_start(body, min(int(rng.uniform(lo, hi) * hay), latest), latest, decode) for _ in facts)

    ids: list[int] = list(prefix)
    keep: list[int] = []
    positions: list[int] = []
    consumed = 0
    for (piece, keep_start, keep_end), point in zip(pieces, points, strict=True):
        ids += body[consumed:point]
        consumed = point
        positions.append(len(ids))
        if include_facts:
            keep += range(len(ids) + keep_start, len(ids) + keep_end)
            ids += piece
    ids += body[consumed:]
    prompt_end = len(ids)
    is_answer: list[bool] = [False] * len(ids)
    spans: list[tuple[int, int]] = []
    for question, answer in turns:
        ids += question
        is_answer += [False] * len(question)
        spans.append((len(ids), len(ids) + len(answer)))
        ids += answer
        is_answer += [True] * len(answer)
    # the loss that trains answer token i sits at position i - 1 (next-token prediction)
    mask = torch.tensor(is_answer[1:] + [False])
    return FactDocument(
        ids=torch.tensor(ids),
        answer_mask=mask,
        keep_positions=keep,
        facts=facts,
        asked=asked,
        fact_positions=positions if include_facts else [],
        prompt_end=prompt_end,
        answer_spans=spans,
    )


def _sentence_start(body: list[int], point: int, latest: int, decode: object, reach: int = 80) -> int:
    """The nearest position at or after ``point`` (else before it), up to ``reach`` tokens away and
    not past ``latest``, that follows the end of a sentence: a fact reads as a sentence of its own."""

    def ends_sentence(p: int) -> bool:
        return p == 0 or decode([body[p - 1]]).rstrip(" ").endswith((".", "!", "?", "\n"))  # type: ignore[operator]

    for p in range(point, min(point + reach, latest + 1)):
        if ends_sentence(p):
            return p
    for p in range(point - 1, max(-1, point - reach), -1):
        if ends_sentence(p):
            return p
    return point


def normalise(text: str) -> str:
    """Lower case, punctuation and extra spaces removed: how answers and values are compared."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def value_holds(answer: str, value: str, other_values: Sequence[str] = ()) -> bool:
    """An answer counts when it contains ``value`` (normalised, whole words) and none of ``other_values``."""
    said = f" {normalise(answer)} "
    if f" {normalise(value)} " not in said:
        return False
    return not any(f" {normalise(other)} " in said for other in other_values if other != value)


def answer_holds(answer: str, fact: Fact, others: Sequence[Fact] = ()) -> bool:
    """``value_holds`` for a fact, the other facts of its document being the values that must not appear."""
    return value_holds(answer, fact.value, [o.value for o in others])


def heldout_fact_haystack(tokenizer: object, essays: list[int] | None = None) -> list[int]:
    """The haystack evaluation fact documents are cut from: the essays (never trained on) and held-out
    Wikipedia, as one token stream (``essays``: the essays' stream when the caller has it already)."""
    if essays is None:
        essays = token_stream([d.text for d in load_essays("all")], tokenizer)
    return essays + token_stream([d.text for d in load_wikipedia("heldout")], tokenizer)
