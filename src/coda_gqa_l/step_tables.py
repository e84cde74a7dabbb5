"""Tables computed once per model step and shared by its layers (the whole-model CUDA graphs).

Every bounded layer of a model works at the same positions in a step: it rotates the same queries, window keys, bank
slots and sinks, and it reads and writes the same ring slots of its window, all fixed by the step's start position
and the layer's shape. A RoPE table costs about nine small kernels (angles, cos, sin, pair expansion, scaling,
casts), the ring's slots three; in a decode step that is launch-bound (every kernel a graph node) computing them once
for all 30 layers of SmolLM2 removes a large share of the step's kernels. ``models.graph_decode`` opens
``step_tables()`` around its step; outside it every call computes its own table, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import Tensor

from .kernels.rope_table import rope_cos_sin
from .primitives import RotaryEmbedding

_TABLES: contextvars.ContextVar[dict[Hashable, Any] | None] = contextvars.ContextVar(
    "coda_gqa_l_step_tables", default=None
)


@contextlib.contextmanager
def step_tables() -> Iterator[None]:
    """Inside this block, ``table`` and ``cos_sin`` calls with the same key return what the first one built. For one
    model step only: keys name positions relative to a start that must not change inside the block."""
    token = _TABLES.set({})
    try:
        yield
    finally:
        _TABLES.reset(token)


def table(key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()``, or what an earlier layer built for ``key`` inside ``step_tables()``. ``key`` must determine the
    result (the start position and the shape that fix it)."""
    tables = _TABLES.get()
    if tables is None:
        return build()
    found = tables.get(key)
    if found is None:
        found = tables[key] = build()
    return found


def cos_sin(
    rope: RotaryEmbedding, key: Hashable, positions: Callable[[], Tensor], dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``rope.cos_sin(positions(), dtype)`` (one kernel on the Triton backend: ``kernels.rope_table``), shared inside
    ``step_tables()`` by rotary embeddings of the same settings (``rope.signature``) for the same ``key``."""
    result: tuple[Tensor, Tensor] = table(_rope_key(rope, key, dtype), lambda: rope_cos_sin(rope, positions(), dtype))
    return result


def cos_sin_range(
    rope: RotaryEmbedding, key: Hashable, start: int | Tensor, count: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``cos_sin`` of the positions ``start + arange(count)``: from a device ``start`` (a 0-d tensor) the Triton
    backend forms them inside the table's kernel, two kernels fewer than building them first."""
    if isinstance(start, Tensor):
        build = lambda: rope_cos_sin(rope, None, dtype, start=start, count=count)  # noqa: E731
        result: tuple[Tensor, Tensor] = table(_rope_key(rope, key, dtype), build)
        return result
    device = rope.inv_freq.device
    return cos_sin(rope, key, lambda: start + torch.arange(count, device=device), dtype)


def _rope_key(rope: RotaryEmbedding, key: Hashable, dtype: torch.dtype) -> Hashable:
    """One key for a table however it is built (``cos_sin`` or ``cos_sin_range``): rotary embeddings of the same
    settings share it."""
    return ("rope", rope.signature, key, dtype, rope.inv_freq.device)
