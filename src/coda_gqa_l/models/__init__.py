"""Hugging Face model support: convert a model's attention, a bounded ``Cache`` for
``generate()``, and loaders for the packaged SmolLM2 and local model folders."""

from .adapters import (
    CoDAAttentionAdapter,
    EveCoDAAdapter,
    GenericCoDAAdapter,
    LlamaCoDAAdapter,
    Qwen3CoDAAdapter,
    spec_from_config,
)
from .cache import BoundedCache, bounded_modules
from .convert import convert, to_bounded
from .generation import bounded_decoding, bounded_generate

__all__ = [
    "BoundedCache",
    "CoDAAttentionAdapter",
    "EveCoDAAdapter",
    "GenericCoDAAdapter",
    "LlamaCoDAAdapter",
    "Qwen3CoDAAdapter",
    "bounded_decoding",
    "bounded_generate",
    "bounded_modules",
    "convert",
    "spec_from_config",
    "to_bounded",
]
