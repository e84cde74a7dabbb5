"""The neural database's exceptions: what a user can fix gets a ``NeuralDBError`` naming the problem."""

from __future__ import annotations


class NeuralDBError(Exception):
    """A request the database cannot serve; the message says why."""


class DocumentNotFound(NeuralDBError):
    """No document with that id or label in the store; ``ref`` is the id or label asked for (the HTTP service names
    only it: the message names the store's folder, which a remote client has no business knowing)."""

    def __init__(self, message: str, ref: int | str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class IngestCancelled(NeuralDBError):
    """The caller stopped an ingest before it finished (``ingest(should_stop=...)``; the HTTP service's client went
    away): nothing was stored."""
