"""Triton kernel of ``residual_norm.add_rms_norm`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _add_rms_norm_kernel(
    H, DELTA, W, H_OUT, Y, eps, D,
    HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One row: ``h + delta`` rounded to the residual's dtype (written to ``H_OUT``), then its RMS norm in float32,
    rounded to the residual's dtype before the gain, as transformers' Llama-family RMSNorm computes it."""
    if PDL:  # a programmatic dependent launch: the kernel before has finished and its writes are visible past here
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    h = tl.load(H + row * D + d, mask=ok, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(DELTA + row * D + d, mask=ok, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(H_OUT + row * D + d, h, mask=ok)
    x = h.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / D
    normed = (x * tl.math.rsqrt(variance + eps)).to(h.dtype).to(tl.float32)
    w = tl.load(W + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * D + d, (w * normed).to(Y.dtype.element_ty), mask=ok)
