"""The stateful neural database: documents kept as fixed-size model states (docs/neural_database.md).

The names below are imported on first use, so that ``coda-db list`` and the other store commands (``neuraldb.cli``,
``neuraldb.store``) start without importing transformers and the model code (about 2 s on a 2-core CPU).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models.tokenizer import ByteTokenizer
    from .engine import (
        DEFAULT_CONFIG,
        DocumentNotFound,
        NeuralDatabase,
        NeuralDBError,
        PromptFormat,
        Session,
        default_model,
    )
    from .errors import IngestCancelled
    from .store import DocumentIndex, DocumentInfo, DocumentStore

_WHERE = {
    "ByteTokenizer": "..models.tokenizer",
    **dict.fromkeys(
        [
            "DEFAULT_CONFIG",
            "DocumentNotFound",
            "NeuralDatabase",
            "NeuralDBError",
            "PromptFormat",
            "Session",
            "default_model",
        ],
        ".engine",
    ),  # fmt: skip
    "IngestCancelled": ".errors",
    **dict.fromkeys(["DocumentIndex", "DocumentInfo", "DocumentStore"], ".store"),
}

__all__ = [
    "DEFAULT_CONFIG",
    "ByteTokenizer",
    "DocumentIndex",
    "DocumentInfo",
    "DocumentStore",
    "DocumentNotFound",
    "IngestCancelled",
    "NeuralDBError",
    "NeuralDatabase",
    "PromptFormat",
    "Session",
    "default_model",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # once
    return value
