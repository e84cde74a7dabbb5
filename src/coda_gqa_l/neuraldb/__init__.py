"""The stateful neural database: documents kept as fixed-size model states (docs/neural_database.md)."""

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
from .store import DocumentIndex, DocumentInfo, DocumentStore

__all__ = [
    "DEFAULT_CONFIG",
    "ByteTokenizer",
    "DocumentIndex",
    "DocumentInfo",
    "DocumentStore",
    "DocumentNotFound",
    "NeuralDBError",
    "NeuralDatabase",
    "PromptFormat",
    "Session",
    "default_model",
]
