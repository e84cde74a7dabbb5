"""The differential combine in one pass: ``N(signal - lambda * noise)``, forward and backward.

After attention, every differential layer subtracts its noise heads, scaled by lambda, from its
signal heads, normalises each head (RMS with a gain per head, or nothing) and lays the heads out
as ``(B, L, H * Dh)`` for ``W_o``. In PyTorch that is about ten passes over float32 temporaries
of the attention output's size, forward and again backward; in a from-scratch training step they
cost more than the second attention itself (benchmarks/results/from_scratch.md, "From-scratch CoDA vs GQA").
Here the forward reads the two streams once and writes the output once, and the backward
recomputes the difference instead of storing it.

``differential_combine`` picks the Triton kernels where ``kernels.backend`` says so, else the
PyTorch reference below (the semantics; tests compare the two).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dispatch import launch, tile_size, use_triton


def combine_reference(attended: Tensor, lam: Tensor, norm_weight: Tensor | None, eps: float) -> Tensor:
    """``attended (B, Hkv, 2G, L, Dh)`` (signal heads of each KV group, then their noise heads),
    ``lam (B, H, L)``, ``norm_weight (H, Dh)`` or None -> ``(B, L, H * Dh)`` in attended's dtype."""
    b, hkv, streams, length, d = attended.shape
    group = streams // 2
    signal = attended[:, :, :group].reshape(b, hkv * group, length, d).float()
    noise = attended[:, :, group:].reshape(b, hkv * group, length, d).float()
    y = signal - lam.float()[..., None] * noise
    if norm_weight is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()[:, None, :]
    return y.to(attended.dtype).transpose(1, 2).reshape(b, length, hkv * group * d)


def differential_combine(attended: Tensor, lam: Tensor, norm_weight: Tensor | None, eps: float) -> Tensor:
    """The combine of ``combine_reference``; fused on the Triton backend (with its backward)."""
    if attended.dim() != 5 or attended.shape[2] % 2:
        raise ValueError(f"attended must be (B, Hkv, 2G, L, Dh), got {tuple(attended.shape)}")
    b, hkv, streams, length, d = attended.shape
    if lam.shape != (b, hkv * streams // 2, length):
        raise ValueError(f"lam must be (B, H, L) = {(b, hkv * streams // 2, length)}, got {tuple(lam.shape)}")
    if norm_weight is not None and norm_weight.shape != (hkv * streams // 2, d):
        raise ValueError(f"norm_weight must be (H, Dh) = {(hkv * streams // 2, d)}, got {tuple(norm_weight.shape)}")
    if not use_triton(attended.device):
        return combine_reference(attended, lam, norm_weight, eps)
    return _FusedCombine.apply(attended, lam, norm_weight, eps)  # type: ignore[no-any-return]


_BLOCK_ROWS = 32


class _FusedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, attended: Tensor, lam: Tensor, norm_weight: Tensor | None, eps: float) -> Tensor:
        from .combine_triton import _combine_fwd_kernel

        if attended.stride(-1) != 1:
            attended = attended.contiguous()
        b, hkv, streams, length, d = attended.shape
        heads, rows = hkv * streams // 2, b * length
        out = torch.empty(b, length, heads * d, device=attended.device, dtype=attended.dtype)
        rstd = torch.empty(heads, rows, device=attended.device, dtype=torch.float32)
        weight = norm_weight if norm_weight is not None else rstd  # a placeholder pointer when there is no norm
        grid = (-(-rows // _BLOCK_ROWS), heads)
        launch(_combine_fwd_kernel, grid,
            attended, lam, weight, out, rstd,
            attended.stride(0), attended.stride(1), attended.stride(2), attended.stride(3),
            lam.stride(0), lam.stride(1), lam.stride(2),
            rows, length, heads, streams // 2, eps,
            HEAD_DIM=d, BLOCK_D=tile_size(d), BLOCK_R=_BLOCK_ROWS, NORM=norm_weight is not None, num_warps=4,
        )  # fmt: skip
        ctx.save_for_backward(attended, lam, norm_weight if norm_weight is not None else rstd[:0], rstd)
        ctx.has_norm = norm_weight is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        from .combine_triton import _combine_bwd_kernel

        attended, lam, weight, rstd = ctx.saved_tensors
        b, hkv, streams, length, d = attended.shape
        heads, rows = hkv * streams // 2, b * length
        grad_out = grad_out.contiguous()
        grad_attended = torch.empty(b, hkv, streams, length, d, device=attended.device, dtype=attended.dtype)
        grad_lam = torch.empty(b, heads, length, device=lam.device, dtype=torch.float32)
        grad_weight = torch.zeros(heads, d, device=attended.device, dtype=torch.float32)
        grid = (-(-rows // _BLOCK_ROWS), heads)
        launch(_combine_bwd_kernel, grid,
            attended, lam, weight if ctx.has_norm else rstd, rstd, grad_out, grad_attended, grad_lam, grad_weight,
            attended.stride(0), attended.stride(1), attended.stride(2), attended.stride(3),
            lam.stride(0), lam.stride(1), lam.stride(2),
            rows, length, heads, streams // 2,
            HEAD_DIM=d, BLOCK_D=tile_size(d), BLOCK_R=_BLOCK_ROWS, NORM=ctx.has_norm, num_warps=4,
        )  # fmt: skip
        return (
            grad_attended,
            grad_lam.to(lam.dtype),
            grad_weight.to(weight.dtype) if ctx.has_norm else None,
            None,
        )
