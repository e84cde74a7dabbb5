"""The King James Bible from Debian's ``bible-kjv`` packages (docs/models_and_data.md): one long single document.

Debian ships the text compressed in its own format (``bible-kjv-text``: ``/usr/lib/bible.data``)
with the program that reads it (``bible-kjv``: ``/usr/bin/bible``). We fetch both pinned .deb
files with ``apt-get download`` (checked by sha256), unpack them with the standard library (a
.deb is an ``ar`` archive holding ``data.tar.xz``), and ask the unpacked program for
Genesis 1:1 to Revelation 22:21. Nothing is installed.

The result is 66 documents, one per book, titled by the book's name; each is the chapters'
headings ("Chapter 3") and numbered verses, one per line. Where ``apt-get`` is missing (not a
Debian system), put the two .deb files in ``<cache>/debs/`` by hand.
"""

from __future__ import annotations

import io
import lzma
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import fetch
from ..fetch import FetchError


class BibleFetchError(FetchError):
    """The bible-kjv packages could not be fetched, checked or read."""


@dataclass(frozen=True)
class DebSource:
    package: str
    version: str
    arch: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version}_{self.arch}.deb"


BIBLE_PROGRAM = DebSource(
    "bible-kjv", "4.38", "amd64", "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"
)
BIBLE_TEXT = DebSource(
    "bible-kjv-text", "4.38", "all", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"
)
WHOLE_BIBLE = "Gen1:1-Rev22:21"
BOOKS = 66
# pretty-printed chapter heading, e.g. "Song of Solomon 3" or "1 Kings 12"
_HEADING = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+(?P<number>\d+) (?P<text>.+)$")


def build_bible(cache_dir: str | Path) -> list[tuple[str, str]]:
    """``(book, text)`` for the 66 books, in canonical order."""
    debs = Path(cache_dir) / "debs"
    program, text = (fetch_deb(source, debs) for source in (BIBLE_PROGRAM, BIBLE_TEXT))
    with tempfile.TemporaryDirectory(prefix="coda-kjv-") as tmp:
        root = Path(tmp)
        for deb in (program, text):
            extract_deb(deb, root)
        dump = _run_bible(root)
    books = parse_bible(dump)
    if len(books) != BOOKS:
        raise BibleFetchError(f"the bible program printed {len(books)} books, expected {BOOKS}")
    return books


def fetch_deb(source: DebSource, folder: Path) -> Path:
    """``folder/<package>_<version>_<arch>.deb``, downloaded with ``apt-get download`` if absent."""
    path = folder / source.filename
    if not path.exists():
        apt = shutil.which("apt-get")
        if apt is None:
            raise BibleFetchError(
                f"{source.filename} is not in {folder} and apt-get is missing (not a Debian system): "
                "download the bible-kjv and bible-kjv-text 4.38 packages from a Debian mirror into that folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".apt-") as tmp:
            done = subprocess.run(
                [apt, "download", f"{source.package}={source.version}"], cwd=tmp, capture_output=True, text=True
            )
            got = Path(tmp) / source.filename
            if done.returncode != 0 or not got.exists():
                command = f"apt-get download {source.package}={source.version}"
                raise BibleFetchError(f"{command} failed: {done.stderr[-500:]}")
            got.replace(path)
    digest = fetch.sha256_file(path)
    if digest != source.sha256:
        raise BibleFetchError(f"{path} has sha256 {digest}, expected {source.sha256}: delete it to fetch it again")
    return path


def extract_deb(deb: Path, root: Path) -> None:
    """Unpack the ``data.tar.*`` member of a .deb (an ``ar`` archive) under ``root``."""
    members = _ar_members(deb.read_bytes(), deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise BibleFetchError(f"{deb} has no data.tar member: not a Debian package")
    payload = members[name]
    if name.endswith(".xz"):
        payload = lzma.decompress(payload)
    elif not name.endswith(".tar"):  # gzip/bz2/zstd data members are not used by these packages
        raise BibleFetchError(f"{deb}: unsupported member {name}")
    with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
        archive.extractall(root, filter="data")


def _ar_members(blob: bytes, where: Path) -> dict[str, bytes]:
    if not blob.startswith(b"!<arch>\n"):
        raise BibleFetchError(f"{where} is not an ar archive (a .deb file)")
    members, offset = {}, 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = offset + 60
        members[name] = blob[start : start + size]
        offset = start + size + (size % 2)  # members are padded to an even length
    return members


def _run_bible(root: Path) -> str:
    program = root / "usr" / "bin" / "bible"
    program.chmod(0o755)
    # -l: pretty-printing with lines long enough that no verse is wrapped
    command = [str(program), "-l", "1000000", "-p", str(root / "usr" / "lib"), WHOLE_BIBLE]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except OSError as err:  # e.g. a missing libreadline on a non-Debian system
        raise BibleFetchError(f"could not run the packaged bible program: {err}") from err
    if done.returncode != 0:
        raise BibleFetchError(f"the bible program failed ({done.returncode}): {done.stderr[-500:]}")
    return done.stdout


def parse_bible(dump: str) -> list[tuple[str, str]]:
    """Books out of the pretty-printed dump: heading lines "Book N", then indented numbered verses."""
    books: list[tuple[str, list[str]]] = []
    for line in dump.splitlines():
        if not line.strip():
            continue
        verse = _VERSE.match(line)
        if verse:
            if not books:
                raise BibleFetchError(f"a verse before any chapter heading: {line[:80]!r}")
            books[-1][1].append(f"{verse['number']} {verse['text'].strip()}")
            continue
        heading = _HEADING.match(line)
        if heading is None:
            raise BibleFetchError(f"unexpected line in the bible program's output: {line[:80]!r}")
        if not books or books[-1][0] != heading["book"]:
            books.append((heading["book"], []))
        books[-1][1].append(f"Chapter {heading['chapter']}")
    return [(book, "\n".join(lines)) for book, lines in books]
