"""A decode step's matrix products, one input row each, as one Triton kernel: ``x @ W.T + b``, optionally with the
gated MLP's ``silu(gate) * up`` computed from the fused gate-and-up row as it is loaded (the down product's input).

A decode step of a small model reads every weight once, and at one row cuBLAS leaves the GPU mostly idle: on an
H100 the folded SmolLM2's four products a layer took 3.7-4.0 us each, 0.49 ms of a 0.89 ms step, where reading
their weights takes 0.2-1.2 us (benchmarks/results/speed.md, "The first request within 10 s of the second"). Here
each program computes ``BLOCK_N`` output rows, so even the 576-row products spread over more programs than the
GPU has multiprocessors, and the down product takes the activation in its prologue (one kernel fewer a layer).

Off unless asked for (``dispatch.row_product_kernels()``) until ``benchmarks/row_products.py`` and
``benchmarks/decode_step.py`` measure it on a GPU. ``row_product_reference`` is the computation it replaces; the
kernel accumulates in float32 in another order than cuBLAS (the tests hold it to twice the reference's error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import launch, row_products, tile_size, use_triton
from .gated_activation import silu_and_mul, silu_and_mul_reference

ROW_BLOCK = 4  # output rows a program (benchmarks/row_products.py times others)
WIDTH_BLOCK = 256  # input columns a loop step


def row_product_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, silu_mul: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, of ``silu_and_mul_reference(x)`` with ``silu_mul``."""
    return F.linear(silu_and_mul_reference(x) if silu_mul else x, weight, bias)


def row_product(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, silu_mul: bool = False, block_n: int = ROW_BLOCK,
    num_warps: int = 4,
) -> Tensor:  # fmt: skip
    """``x (..., K)`` (``(..., 2K)`` gate then up with ``silu_mul``) times ``weight (N, K)``, plus ``bias (N,)``.

    One Triton kernel when ``x`` is a single row on the Triton backend without autograd and
    ``dispatch.row_product_kernels()`` is on; otherwise the module's own path (``silu_and_mul`` then ``F.linear``)."""
    # the cheap test first: every product of a folded model comes here, on the CPU too
    if not row_products() or x.numel() != x.shape[-1] or not use_triton(x.device):
        return F.linear(silu_and_mul(x) if silu_mul else x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(silu_and_mul(x) if silu_mul else x, weight, bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    width, expected = x.shape[-1], weight.shape[1] * (2 if silu_mul else 1)
    if width != expected:
        what = "gate and up halves of the " if silu_mul else ""
        raise ValueError(f"x's last dimension {width} does not match the {what}weight's {weight.shape[1]} inputs")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {weight.dtype}")
    from .row_product_triton import _row_product_kernel

    rows_out, inputs = weight.shape
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty(*x.shape[:-1], rows_out, device=x.device, dtype=x.dtype)
    launch(
        _row_product_kernel, (-(-rows_out // block_n),), x, weight, bias if bias is not None else out, out,
        rows_out, inputs, weight.stride(0), SILU_MUL=silu_mul, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=min(WIDTH_BLOCK, tile_size(inputs)), num_warps=num_warps,
    )  # fmt: skip
    return out
