"""Triton kernels of ``gated_activation`` (imported only when they run)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["HALF"])
def _silu_and_mul_kernel(GATE_UP, OUT, HALF, BLOCK: tl.constexpr):
    """Row ``program_id(0)``: ``OUT[c] = silu(GATE_UP[c]) * GATE_UP[HALF + c]``, each product rounded to the
    input's dtype as PyTorch's two kernels round it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < HALF
    gate = tl.load(GATE_UP + row * 2 * HALF + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + row * 2 * HALF + HALF + cols, mask=ok, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(OUT + row * HALF + cols, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["ROW_STRIDE", "WIDTH"])
def _gate_sigmoid_kernel(LOGITS, OUT, ROW_STRIDE, WIDTH, BLOCK: tl.constexpr):
    """Row ``program_id(0)``: ``OUT[row, c] = sigmoid(float32(LOGITS[row * ROW_STRIDE + c]))``, OUT contiguous."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < WIDTH
    x = tl.load(LOGITS + row * ROW_STRIDE + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * WIDTH + cols, 1.0 / (1.0 + tl.exp(-x)), mask=ok)
