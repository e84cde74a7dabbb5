"""The King James Bible from Debian's bible-kjv packages: unpacking, parsing, checks, the real text.

The slow test fetches the two pinned .deb files (2.5 MB) with apt-get into a temporary cache.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from coda_gqa_l.data import bible, corpora
from coda_gqa_l.data.bible import BIBLE_TEXT, BibleFetchError, extract_deb, fetch_deb, parse_bible

DUMP = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.

Genesis 2

  1 Thus the heavens and the earth were finished.

Song of Solomon 1

  1 The song of songs, which is Solomon's.
"""


def test_parse_bible_groups_chapters_into_books() -> None:
    books = parse_bible(DUMP)
    assert [title for title, _ in books] == ["Genesis", "Song of Solomon"]
    assert books[0][1].splitlines() == [
        "Chapter 1",
        "1 In the beginning God created the heaven and the earth.",
        "2 And the earth was without form, and void.",
        "Chapter 2",
        "1 Thus the heavens and the earth were finished.",
    ]


def test_parse_bible_names_an_unexpected_line() -> None:
    with pytest.raises(BibleFetchError, match="unexpected line"):
        parse_bible("Genesis 1\n  1 In the beginning.\n>>> not a verse\n")


def _deb(files: dict[str, bytes]) -> bytes:
    """A minimal .deb: an ar archive with debian-binary and a data.tar member (uncompressed)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    blob = b"!<arch>\n"
    for name, data in (("debian-binary", b"2.0\n"), ("data.tar", tar_bytes.getvalue())):
        blob += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii") + data
        blob += b"\n" if len(data) % 2 else b""
    return blob


def test_extract_deb_unpacks_the_data_member(tmp_path: Path) -> None:
    deb = tmp_path / "x.deb"
    deb.write_bytes(_deb({"./usr/lib/bible.data": b"abc", "./usr/share/doc/x/copyright": b"free"}))
    extract_deb(deb, tmp_path / "root")
    assert (tmp_path / "root/usr/lib/bible.data").read_bytes() == b"abc"


def test_extract_deb_refuses_a_file_that_is_not_a_package(tmp_path: Path) -> None:
    deb = tmp_path / "x.deb"
    deb.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(BibleFetchError, match="not an ar archive"):
        extract_deb(deb, tmp_path / "root")


def test_fetch_deb_refuses_a_file_with_another_checksum(tmp_path: Path) -> None:
    (tmp_path / BIBLE_TEXT.filename).write_bytes(b"tampered")
    with pytest.raises(BibleFetchError, match="sha256"):
        fetch_deb(BIBLE_TEXT, tmp_path)


def test_fetch_deb_without_apt_get_says_where_to_put_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    with pytest.raises(BibleFetchError, match="apt-get is missing"):
        fetch_deb(BIBLE_TEXT, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="fetching the Debian packages needs apt-get")
def test_the_real_bible_is_one_long_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    books = corpora.load_bible(cache_dir=tmp_path)
    assert len(books) == 66 and books[0].title == "Genesis" and books[-1].title == "Revelation"
    assert books[0].text.startswith("Chapter 1\n1 In the beginning God created the heaven and the earth.")
    assert books[-1].text.endswith("21 The grace of our Lord Jesus Christ be with you all. Amen.")
    text = corpora.bible_text(cache_dir=tmp_path)
    assert 4_000_000 < len(text) < 4_500_000  # far more than the 16K tokens flatness reads

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(corpora, "build_bible_documents", refuse)
    monkeypatch.setitem(corpora._BUILDERS, "bible-kjv", ("debian bible-kjv==4.38", refuse))
    assert corpora.load_bible(cache_dir=tmp_path) == books
