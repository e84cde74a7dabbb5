"""Gate activations in one pass each: the gated MLP's ``silu(gate) * up`` from the fused gate-and-up product, and
the attention's lambda and write gates, ``sigmoid`` in float32 of their columns of the fused input product.

A Llama-family MLP computes ``down(silu(gate(x)) * up(x))``; with the gate and up products fused
(``models.inference``), what lies between them and ``down`` is two elementwise kernels, which in a decode step
under a CUDA graph cost about as much as their work. ``silu_and_mul`` is one. The result is PyTorch's, rounding
included: ``silu`` rounded to the input's dtype, then the product rounded (``silu_and_mul_reference``).

The bounded layer's gates (``BoundedCoDAAttention.project_inputs``) are ``sigmoid(logits.float())`` of a strided
slice of the fused product: on 16-bit weights a copy kernel and a sigmoid kernel per layer and step, one pass here
(``gate_sigmoid``; ``gate_sigmoid_reference`` is that expression).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import launch, tile_size, use_triton

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


def gate_sigmoid_reference(logits: Tensor) -> Tensor:
    """``sigmoid`` of ``logits`` computed in float32: the gates as the layer computes them."""
    return torch.sigmoid(logits.float())


def gate_sigmoid(logits: Tensor) -> Tensor:
    """``gate_sigmoid_reference`` in one Triton pass on the Triton backend, for ``logits (..., n)`` with a unit last
    stride whose leading dimensions merge into rows of one stride (a column slice of a product's output); a
    contiguous float32 result."""
    if (
        not use_triton(logits.device)
        or torch.is_grad_enabled()
        and logits.requires_grad
        or logits.dim() < 2
        or logits.numel() == 0
    ):
        return gate_sigmoid_reference(logits)
    width = logits.shape[-1]
    rows = logits.numel() // width
    if logits.stride(-1) != 1 or not _rows_of_one_stride(logits):
        logits = logits.contiguous()
    from .gated_activation_triton import _gate_sigmoid_kernel

    out = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    block = tile_size(width)
    launch(_gate_sigmoid_kernel, (rows,), logits, out, logits.stride(-2), width, BLOCK=block, num_warps=1)
    return out


def _rows_of_one_stride(t: Tensor) -> bool:
    """Whether every leading dimension of ``t`` steps by its inner neighbour's extent times its stride (size-1
    dimensions step anywhere), so row ``r`` starts at ``r * t.stride(-2)``."""
    for dim in range(t.dim() - 2):
        if t.shape[dim] > 1 and t.stride(dim) != t.shape[dim + 1] * t.stride(dim + 1):
            return False
    return True
