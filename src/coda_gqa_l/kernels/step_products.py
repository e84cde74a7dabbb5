"""A decode step's matrix products with the work before them in their prologue: the residual add and RMS norm
before a block's input product, the gated activation before the MLP's down product.

In the whole-model graph step (``models.graph_decode``) of a small model, every kernel costs about as much as its
work: on an H100 the folded SmolLM2 step ran 318 kernels in 1.03 ms, its products at 3.7-4.0 us each where reading
their weights takes 0.2-1.2 us, and the residual norms (61 a step) and the activation (30) at 1.3-1.6 us each plus
their gaps (benchmarks/results/speed.md). Here each program of a one-row product forms the whole input row itself
(residual add, norm, activation: a few KiB, from L2), so those kernels disappear: three fewer a layer.

``norm_product`` is ``residual_norm.add_rms_norm`` then ``F.linear``; ``activated_product`` is
``gated_activation.silu_and_mul`` then ``F.linear``. The kernel rounds every intermediate as those do (the sum and
the normalised row to the residual's dtype, the activation's two products to the input's) and accumulates the
product in float32, in another order than cuBLAS; the references (``norm_product_reference``,
``activated_product_reference``) are the computations they replace. Whether the decoder takes them is
``dispatch.step_product_prologues``' choice (on by default: on an H100 the folded SmolLM2's step went from 952 to
1,100 tokens/s, benchmarks/results/speed.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import dependent_launch_meta, launch, tile_size, use_triton
from .gated_activation import silu_and_mul_reference
from .residual_norm import add_rms_norm_reference

MAX_BLOCK_K = 2048  # input columns a loop step: the rows of SmolLM2 (576, 1536) in one


def norm_product_reference(
    h: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(h + delta, F.linear(RMSNorm(h + delta), weight, bias))`` (``delta`` None: no add)."""
    h, normed = add_rms_norm_reference(h, delta, norm_weight, eps)
    return h, F.linear(normed, weight, bias)


def activated_product_reference(gate_up: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(silu(gate) * up, weight, bias)`` of ``gate_up (..., 2I)``, gate then up."""
    return F.linear(silu_and_mul_reference(gate_up), weight, bias)


def norm_product(
    h: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``norm_product_reference`` for one row ``h (1, 1, K)``: one Triton kernel on the Triton backend without
    autograd, else the reference. ``weight (N, K)``; ``norm_weight (K,)`` in ``h``'s dtype."""
    _check(h, weight, h.shape[-1], "h")
    if delta is not None and delta.shape != h.shape:
        raise ValueError(f"delta {tuple(delta.shape)} must match h {tuple(h.shape)}")
    if norm_weight.shape != (h.shape[-1],) or norm_weight.dtype != h.dtype:
        raise ValueError(
            f"the norm's weight must be ({h.shape[-1]},) {h.dtype}, got {tuple(norm_weight.shape)} {norm_weight.dtype}"
        )
    if not _kernel_runs(h, weight, delta, norm_weight, bias):
        return norm_product_reference(h, delta, norm_weight, eps, weight, bias)
    h = h.contiguous()
    h_out = torch.empty_like(h) if delta is not None else h
    delta_c = delta.to(h.dtype).contiguous() if delta is not None else h
    y = _launch(h, delta_c, norm_weight, h_out, weight, bias, eps, 2 if delta is not None else 1)
    return h_out, y


def activated_product(gate_up: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``activated_product_reference`` for one row ``gate_up (1, 1, 2K)``: one Triton kernel on the Triton backend
    without autograd, else the reference. ``weight (N, K)``."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"gate_up must hold the gate and up halves side by side, got a last dimension of {width}")
    _check(gate_up, weight, width // 2, "gate_up's halves")
    if not _kernel_runs(gate_up, weight, bias):
        return activated_product_reference(gate_up, weight, bias)
    gate_up = gate_up.contiguous()
    return _launch(gate_up, gate_up, weight, gate_up, weight, bias, 0.0, 3)


def _check(x: Tensor, weight: Tensor, width: int, what: str) -> None:
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight {tuple(weight.shape)} must be (out_features, {width}) for {what} of width {width}")
    if x.dtype != weight.dtype:
        raise ValueError(f"the input is {x.dtype} but the weight is {weight.dtype}")


def _kernel_runs(x: Tensor, *others: Tensor | None) -> bool:
    """One input row on the Triton backend, no gradient wanted for it or any of ``others``."""
    if x.numel() != x.shape[-1] or not use_triton(x.device):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)))


def _launch(
    x: Tensor, delta: Tensor, norm_weight: Tensor, h_out: Tensor, weight: Tensor, bias: Tensor | None, eps: float,
    prologue: int,
) -> Tensor:  # fmt: skip
    from .step_products_triton import _step_product_kernel

    rows_out, inputs = weight.shape
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    # more programs than multiprocessors even for 576 rows; two to four rows share each x stretch's registers
    block_n = 4 if rows_out >= 2048 else 2
    y = torch.empty(*x.shape[:-1], rows_out, device=x.device, dtype=x.dtype)
    launch(
        _step_product_kernel, (-(-rows_out // block_n),), x, delta, norm_weight.contiguous(), h_out, weight,
        bias.contiguous() if bias is not None else y, y, rows_out, inputs, weight.stride(0), eps, PROLOGUE=prologue,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=min(MAX_BLOCK_K, tile_size(inputs)), num_warps=4,
        **dependent_launch_meta(x.device),
    )  # fmt: skip
    return y
