"""The gated MLP's activation in one pass: ``silu(gate) * up`` from the fused gate-and-up product.

A Llama-family MLP computes ``down(silu(gate(x)) * up(x))``; with the gate and up products fused
(``models.inference``), what lies between them and ``down`` is two elementwise kernels, which in a decode step
under a CUDA graph cost about as much as their work. ``silu_and_mul`` is one. The result is PyTorch's, rounding
included: ``silu`` rounded to the input's dtype, then the product rounded (``silu_and_mul_reference``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import launch, use_triton

_BLOCK = 1024


def silu_and_mul_reference(gate_up: Tensor) -> Tensor:
    """``gate_up (..., 2I)`` (gate then up) -> ``silu(gate) * up (..., I)``, as the module computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """``silu_and_mul_reference`` in one Triton pass on the Triton backend."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"gate_up must hold the gate and up halves side by side, got a last dimension of {width}")
    if not use_triton(gate_up.device) or torch.is_grad_enabled() and gate_up.requires_grad:
        return silu_and_mul_reference(gate_up)
    from .gated_activation_triton import _silu_and_mul_kernel

    half = width // 2
    rows = gate_up.numel() // width
    gate_up = gate_up.contiguous()
    out = torch.empty(*gate_up.shape[:-1], half, device=gate_up.device, dtype=gate_up.dtype)
    launch(_silu_and_mul_kernel, (rows, -(-half // _BLOCK)), gate_up, out, half, BLOCK=_BLOCK, num_warps=4)
    return out
