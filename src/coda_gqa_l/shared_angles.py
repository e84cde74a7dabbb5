"""RoPE tables computed once per model step and shared by its layers (the whole-model CUDA graphs).

Every bounded layer of a model rotates the same positions in a step: the queries, the window's keys, the bank
slots and the sinks of each segment, all fixed by the step's start position and the layer's shape. Each table costs
about nine small kernels (angles, cos, sin, pair expansion, scaling, casts), four tables per layer; in a decode step
that is launch-bound (every kernel a graph node) computing them once for all 30 layers of SmolLM2 removes about a
quarter of the step's kernels. ``models.graph_decode`` opens ``shared_angles()`` around its step; outside it every
call computes its own table, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator

import torch
from torch import Tensor

from .primitives import RotaryEmbedding

_TABLES: contextvars.ContextVar[dict[Hashable, tuple[Tensor, Tensor]] | None] = contextvars.ContextVar(
    "coda_gqa_l_shared_angles", default=None
)


@contextlib.contextmanager
def shared_angles() -> Iterator[None]:
    """Inside this block, ``cos_sin`` calls with the same rotary settings and key return the same tables. For one
    model step only: the key names positions relative to a start that must not change inside the block."""
    token = _TABLES.set({})
    try:
        yield
    finally:
        _TABLES.reset(token)


def cos_sin(
    rope: RotaryEmbedding, key: Hashable, positions: Callable[[], Tensor], dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``rope.cos_sin(positions(), dtype)``, or the table an earlier layer built for the same ``key`` inside
    ``shared_angles()``. ``key`` must determine the positions (the start position and the shape that fix them)."""
    tables = _TABLES.get()
    if tables is None:
        return rope.cos_sin(positions(), dtype)
    full_key = (rope.signature, key, dtype, rope.inv_freq.device)
    table = tables.get(full_key)
    if table is None:
        table = tables[full_key] = rope.cos_sin(positions(), dtype)
    return table
