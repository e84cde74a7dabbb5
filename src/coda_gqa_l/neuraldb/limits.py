"""What one request to the neural database may ask for: shared by the engine, the command line and the service, and
importable without the model's dependencies (``coda-db`` checks its arguments before a model loads)."""

from __future__ import annotations

MAX_LABEL = 200  # characters; a label names a document in lists and export file names
MAX_QUESTION_CHARS = 4000  # a question is a line, not a second document
MAX_TEMPERATURE = 2.0  # above it sampling gives noise, not answers
MAX_NEW_TOKENS = 1024  # an answer is one line; the service's and the command line's cap
