"""A store folder: its SQLite index (one row per ingested document, written in transactions) and its state files.

``DocumentStore`` is everything that needs no model: list, show, delete and export read or change
only the index and the files, so ``coda-db list`` answers at once instead of loading a model first.

The index lives next to the state files (``<store>/index.sqlite``) in WAL mode, so readers never
block the writer and two processes writing the same store serialize on SQLite's lock instead of
corrupting it. A row is inserted only after its state file is on disk (written atomically).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..statefile import atomic_write_bytes, stale_temporaries
from .errors import DocumentNotFound, NeuralDBError

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    source_sha256 TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL,
    config TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    created TEXT NOT NULL,
    state_bytes INTEGER NOT NULL,
    file_bytes INTEGER NOT NULL,
    full_cache_bytes INTEGER NOT NULL,
    state_file TEXT NOT NULL,
    UNIQUE (source_sha256, model_fingerprint, config)
);
"""


@dataclass
class DocumentInfo:
    """What the index knows about one document (sizes in bytes)."""

    id: int
    label: str
    source_sha256: str
    model_fingerprint: str
    config: dict[str, Any]
    tokens: int
    created: str
    state_bytes: int
    file_bytes: int
    full_cache_bytes: int
    state_file: str
    duplicate: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


log = logging.getLogger(__name__)


def export_file_name(info: DocumentInfo) -> str:
    """A file name for document ``info``'s exported state: its id and at most 80 characters of its label (a file
    name has a length limit: 255 bytes on most systems), as letters, digits, '.', '_' and '-'."""
    return f"{info.id}-{re.sub(r'[^A-Za-z0-9._-]+', '-', info.label)[:80].strip('-.') or 'document'}.state"


_COLUMNS = (
    "id, label, source_sha256, model_fingerprint, config, tokens, created, "
    "state_bytes, file_bytes, full_cache_bytes, state_file"
)


class DocumentIndex:
    """The SQLite table of documents (one connection per call: safe across threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def _row(self, row: tuple[Any, ...]) -> DocumentInfo:
        values = list(row)
        values[4] = json.loads(values[4])
        return DocumentInfo(*values)

    def find_source(self, source_sha256: str, fingerprint: str, config: dict[str, Any]) -> DocumentInfo | None:
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE source_sha256=? AND model_fingerprint=? AND config=?",
                (source_sha256, fingerprint, json.dumps(config, sort_keys=True)),
            ).fetchone()
        return None if row is None else self._row(row)

    def insert(self, info: DocumentInfo) -> DocumentInfo:
        """Insert a row (``info.id`` is ignored) and return it with its id; raises
        ``sqlite3.IntegrityError`` if the same source is already stored for this model/config."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.execute(
                "INSERT INTO documents (label, source_sha256, model_fingerprint, config, tokens, created, state_bytes,"
                " file_bytes, full_cache_bytes, state_file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    info.label,
                    info.source_sha256,
                    info.model_fingerprint,
                    json.dumps(info.config, sort_keys=True),
                    info.tokens,
                    info.created,
                    info.state_bytes,
                    info.file_bytes,
                    info.full_cache_bytes,
                    info.state_file,
                ),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
        info.id = int(cursor.lastrowid or 0)
        return info

    def all(self) -> list[DocumentInfo]:
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM documents ORDER BY id").fetchall()
        return [self._row(row) for row in rows]

    def get(self, ref: int | str) -> DocumentInfo | None:
        with self._connect() as conn:
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                row = conn.execute(f"SELECT {_COLUMNS} FROM documents WHERE id=?", (int(ref),)).fetchone()
            else:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM documents WHERE label=? ORDER BY id DESC LIMIT 1", (ref,)
                ).fetchone()
        return None if row is None else self._row(row)

    def delete(self, doc_id: int) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM documents WHERE id=?", (doc_id,))


class DocumentStore:
    """A store folder: ``index.sqlite`` and ``states/`` (created if missing). Needs no model."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.states_dir = self.folder / "states"
        self.states_dir.mkdir(parents=True, exist_ok=True)
        self.index = DocumentIndex(self.folder / "index.sqlite")
        self.removed_temporaries = self._remove_stale_temporaries()
        orphans = self.orphans()
        if orphans:
            log.warning(
                "%s: %d state file(s) have no index row (a crash between saving and indexing?): %s",
                self.folder,
                len(orphans),
                ", ".join(p.name for p in orphans[:5]),
            )

    def _remove_stale_temporaries(self) -> list[Path]:
        """Delete what interrupted saves left behind (their writers are gone); returns what was removed."""
        removed = []
        for path in stale_temporaries(self.states_dir):
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def orphans(self) -> list[Path]:
        """State files that no index row names (a crash between writing a state and inserting its row)."""
        named = {info.state_file for info in self.index.all()}
        return sorted(p for p in self.states_dir.glob("*.state") if p.name not in named)

    def list(self) -> list[DocumentInfo]:
        return self.index.all()

    def show(self, ref: int | str) -> DocumentInfo:
        info = self.index.get(ref)
        if info is None:
            raise DocumentNotFound(f"no document {ref!r} in {self.folder}", ref=ref)
        return info

    def new_state_path(self) -> Path:
        """A fresh state file name made by the store (random, never taken from a file or a request)."""
        while True:
            path = self.states_dir / f"{secrets.token_hex(12)}.state"
            if not path.exists():
                return path

    def state_path(self, info: DocumentInfo) -> Path:
        return self.states_dir / info.state_file

    def delete(self, ref: int | str) -> None:
        info = self.show(ref)
        self.index.delete(info.id)
        self.state_path(info).unlink(missing_ok=True)

    def export(self, ref: int | str, dest: str | Path, *, overwrite: bool = False, mode: int | None = None) -> Path:
        """Copy document ``ref``'s state file to ``dest`` (atomically) and return where it went: into a folder
        ``dest`` as ``export_file_name``. An existing file is replaced only with ``overwrite``, and nothing is ever
        written inside the store's own folder (its index and states). ``mode``: the copy's permission bits (else
        those of a private temporary file, 0600)."""
        info = self.show(ref)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / export_file_name(info)
        if not dest.parent.is_dir():
            raise NeuralDBError(f"cannot export to {dest}: the folder {dest.parent} does not exist")
        if dest.resolve().is_relative_to(self.folder.resolve()):
            raise NeuralDBError(f"will not export into the store's own folder {self.folder} (give a path outside it)")
        if dest.exists() and not overwrite:
            raise NeuralDBError(f"{dest} already exists; choose another name or replace it (overwrite, or --force)")
        source = self.state_path(info)
        try:
            data = source.read_bytes()
        except FileNotFoundError as err:
            raise NeuralDBError(f"document #{info.id}'s state file is missing from the store ({source})") from err
        atomic_write_bytes(dest, data)
        if mode is not None:
            dest.chmod(mode)
        return dest
