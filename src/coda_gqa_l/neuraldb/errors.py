"""The neural database's exceptions: what a user can fix gets a ``NeuralDBError`` naming the problem."""

from __future__ import annotations


class NeuralDBError(Exception):
    """A request the database cannot serve; the message says why."""


class DocumentNotFound(NeuralDBError):
    """No document with that id or label in the store."""
