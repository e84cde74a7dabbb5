"""A RoPE table in one kernel: the cos and sin of some positions, as ``RotaryEmbedding.cos_sin`` computes them.

``RotaryEmbedding.cos_sin`` is about nine small kernels (the positions to float64, the angles, cos, sin, the pairs
expanded, scaled, cast), plus two for positions ``start + arange(n)``. A graph decoder builds such tables every
step (``step_tables.py``): for one bounded layer decoding alone they were a third of the 7B step's PyTorch kernels
(benchmarks/results/speed.md). ``rope_cos_sin`` builds one in one Triton pass on the Triton backend, with the same
float64 arithmetic (on CUDA both are libdevice's ``cos`` and ``sin``), so the tables agree with the reference to
the last bit of their dtype but for a rare tie; ``rope_cos_sin_reference`` is the module's own computation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..primitives import RotaryEmbedding
from .dispatch import dependent_launch_meta, launch, tile_size, use_triton


def rope_cos_sin_reference(
    rope: RotaryEmbedding, positions: Tensor, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``rope.cos_sin(positions, dtype)``: shapes ``positions.shape + (head_dim,)``."""
    return rope.cos_sin(positions, dtype)


def rope_cos_sin(
    rope: RotaryEmbedding,
    positions: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    start: Tensor | None = None,
    count: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The cos and sin tables of integer ``positions`` (any shape), or of ``start + arange(count)`` for a 0-d
    integer ``start`` on the device (nothing read back to the host): shapes ``(..., head_dim)`` in ``dtype``. One
    Triton kernel for float32 tables on the Triton backend, else ``rope_cos_sin_reference``."""
    if (positions is None) == (start is None):
        raise ValueError("give the positions, or a start and a count")
    if start is not None:
        if start.dim() != 0 or start.dtype not in (torch.int32, torch.int64) or count is None or count < 1:
            raise ValueError(
                f"start must be a 0-d integer tensor and count positive, got {tuple(start.shape)} {start.dtype} "
                f"and {count!r}"
            )
        where = start
    else:
        assert positions is not None  # checked above
        if positions.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"positions must be integers, got {positions.dtype}")
        where = positions
    # float32 tables only (what the rotation kernels read): a float64 value rounds to them in one step
    if dtype != torch.float32 or not use_triton(where.device) or where.device != rope.inv_freq.device:
        if positions is None:
            assert start is not None and count is not None
            positions = start + torch.arange(count, device=start.device)
        return rope_cos_sin_reference(rope, positions, dtype)
    from .rope_table_triton import _rope_table_kernel

    shape = (count,) if start is not None else tuple(where.shape)
    rows = count if start is not None else where.numel()
    head_dim = rope.head_dim
    cos = torch.empty(*shape, head_dim, device=where.device, dtype=dtype)
    sin = torch.empty_like(cos)
    if rows:
        scale = _scale(rope, where.device)
        launch(
            _rope_table_kernel, (rows,), where.contiguous(), rope.inv_freq, scale, cos, sin, head_dim // 2,
            FROM_START=start is not None, INTERLEAVED=rope.layout == "interleaved", BLOCK_D=tile_size(head_dim),
            **dependent_launch_meta(where.device),
        )  # fmt: skip
    return cos, sin


def _scale(rope: RotaryEmbedding, device: torch.device) -> Tensor:
    """The attention scaling as a float64 device scalar (a Python float argument would reach the kernel as float32),
    made once per module and device by a fill kernel (no copy from the host, so no synchronisation)."""
    cached: Tensor | None = getattr(rope, "_scale_on_device", None)
    if cached is None or cached.device != device:
        cached = torch.full((), float(rope.attention_scaling), dtype=torch.float64, device=device)
        rope._scale_on_device = cached  # type: ignore[attr-defined]  # a plain attribute: not state, not a buffer
    return cached
