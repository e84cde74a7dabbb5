"""Triton kernel of ``rope_table`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _rope_table_kernel(
    POS, INV, SCALE, COS, SIN, HALF,
    FROM_START: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Row ``i``: the cos and sin of position ``POS[i]`` (``POS[0] + i`` with ``FROM_START``) times every pair's
    frequency, in float64 as ``RotaryEmbedding.cos_sin`` computes them, scaled, expanded to the layout's ``2 * HALF``
    columns and rounded to the tables' dtype."""
    if PDL:  # a programmatic dependent launch: the kernel before has finished and its writes are visible past here
        gdc_wait()
        gdc_launch_dependents()
    i = tl.program_id(0)
    if FROM_START:
        position = tl.load(POS) + i
    else:
        position = tl.load(POS + i)
    d = tl.arange(0, BLOCK_D)
    ok = d < 2 * HALF
    if INTERLEAVED:
        pair = d // 2
    else:
        pair = d % HALF
    angle = position.to(tl.float64) * tl.load(INV + pair, mask=ok, other=0.0).to(tl.float64)
    scale = tl.load(SCALE)
    row = i.to(tl.int64) * 2 * HALF + d
    tl.store(COS + row, (tl.cos(angle) * scale).to(COS.dtype.element_ty), mask=ok)
    tl.store(SIN + row, (tl.sin(angle) * scale).to(SIN.dtype.element_ty), mask=ok)
