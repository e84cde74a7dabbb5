"""RoPE and the noise rotation in one pass: the inference path's query stacking and key rotation.

``stack_rotated_queries`` reads the projected queries once and writes the stacked attention
input ``(B, Hkv, 2G, L, Dh)`` (signal heads of each KV group, then their noise heads): RoPE at
each token's position, and for the noise heads RoPE plus the head's learned angles (both turn
the same pairs, so the angles add). ``rotate_keys`` applies RoPE to keys. In PyTorch these are
several passes over float32 temporaries; here they are one read and one write, in the input's
dtype, with the rotation computed in float32 registers.

``stack_rotated_queries`` and ``rotate_keys`` have no autograd (inference). ``rotate_and_stack``
is the differentiable form for training (the default ``sdpa`` unbounded path): the same
forward kernel, and a backward kernel that turns each stream's gradient back by its angle and
sums the gradient of the learned noise angles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..primitives import RopeLayout, apply_rope, expand_pairs
from .dispatch import launch, use_triton


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def stack_rotated_queries(
    q: Tensor, cos: Tensor, sin: Tensor, theta_cos: Tensor | None, theta_sin: Tensor | None, num_kv_heads: int,
    layout: RopeLayout,
) -> Tensor:  # fmt: skip
    """``q (B, H, L, Dh)`` before RoPE (any strides with a unit last stride) -> stacked
    ``(B, Hkv, 2G or G, L, Dh)``. ``cos, sin (L, Dh)`` float32 for the tokens' positions;
    ``theta_cos, theta_sin (H, Dh)`` float32 noise angles (None: no noise heads)."""
    B, H, L, D = q.shape
    group = H // num_kv_heads
    noise = theta_cos is not None and theta_sin is not None
    streams = 2 * group if noise else group
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(B, num_kv_heads, streams, L, D, device=q.device, dtype=q.dtype)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    tcos = theta_cos.float().contiguous() if noise and theta_cos is not None else cos
    tsin = theta_sin.float().contiguous() if noise and theta_sin is not None else sin
    from .rope_triton import _rotate_kernel

    block_l = 32
    launch(_rotate_kernel, (-(-L // block_l), B * H),
        q, cos, sin, tcos, tsin, out,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        L, H, group,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_L=block_l, HALF=layout == "half", NOISE=noise, num_warps=4,
    )  # fmt: skip
    return out


def rotate_keys(k: Tensor, cos: Tensor, sin: Tensor, layout: RopeLayout) -> Tensor:
    """RoPE of ``k (B, Hkv, L, Dh)`` at the positions whose ``cos, sin (L, Dh)`` are given."""
    B, Hkv, L, D = k.shape
    return stack_rotated_queries(k, cos, sin, None, None, Hkv, layout).view(B, Hkv, L, D)


def stack_rotated_queries_reference(
    q: Tensor, cos: Tensor, sin: Tensor, theta_cos: Tensor | None, theta_sin: Tensor | None, num_kv_heads: int,
    layout: RopeLayout,
) -> Tensor:  # fmt: skip
    """The PyTorch reference of ``stack_rotated_queries`` (float32 arithmetic)."""
    B, H, L, D = q.shape
    group = H // num_kv_heads
    signal = apply_rope(q.float(), cos.float(), sin.float(), layout)
    parts = [signal.view(B, num_kv_heads, group, L, D)]
    if theta_cos is not None and theta_sin is not None:
        noise = apply_rope(signal, theta_cos.float()[:, None], theta_sin.float()[:, None], layout)
        parts.append(noise.view(B, num_kv_heads, group, L, D))
    return torch.cat(parts, dim=2).to(q.dtype)


def rotate_and_stack(
    q: Tensor, cos: Tensor, sin: Tensor, theta: Tensor | None, num_kv_heads: int, layout: RopeLayout
) -> Tensor:
    """Differentiable ``stack_rotated_queries``: ``q (B, H, L, Dh)`` before RoPE, ``cos, sin (L, Dh)``
    for the tokens' positions, ``theta (H, Dh/2)`` the noise angles (None: no noise heads) ->
    ``(B, Hkv, 2G or G, L, Dh)``, with gradients for ``q`` and ``theta``. Keys: ``num_kv_heads``
    equal to their head count and no ``theta`` (the result's stream axis has size 1)."""
    if not use_triton(q.device):
        return rotate_and_stack_reference(q, cos, sin, theta, num_kv_heads, layout)
    return _RotateStack.apply(q, cos, sin, theta, num_kv_heads, layout)  # type: ignore[no-any-return]


def rotate_and_stack_reference(
    q: Tensor, cos: Tensor, sin: Tensor, theta: Tensor | None, num_kv_heads: int, layout: RopeLayout
) -> Tensor:
    """The PyTorch reference of ``rotate_and_stack`` (differentiable)."""
    t_cos, t_sin = expand_pairs(theta.cos(), theta.sin(), layout) if theta is not None else (None, None)
    return stack_rotated_queries_reference(q, cos, sin, t_cos, t_sin, num_kv_heads, layout)


class _RotateStack(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: Tensor, cos: Tensor, sin: Tensor, theta: Tensor | None, num_kv_heads: int, layout: RopeLayout
    ) -> Tensor:
        t_cos = t_sin = None
        if theta is not None:
            t_cos, t_sin = expand_pairs(theta.float().cos(), theta.float().sin(), layout)
        out = stack_rotated_queries(q, cos, sin, t_cos, t_sin, num_kv_heads, layout)
        ctx.save_for_backward(q, cos.float().contiguous(), sin.float().contiguous(), t_cos, t_sin, theta)
        ctx.num_kv_heads, ctx.layout = num_kv_heads, layout
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        from .rope_triton import _rotate_bwd_kernel

        q, cos, sin, t_cos, t_sin, theta = ctx.saved_tensors
        B, H, L, D = q.shape
        noise = theta is not None
        if q.stride(-1) != 1:
            q = q.contiguous()
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        grad_q = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
        per_dim = torch.zeros(H, D, device=q.device, dtype=torch.float32)  # d loss / d angle, per dimension
        block_l = 32
        launch(_rotate_bwd_kernel, (-(-L // block_l), B * H),
            grad, q, cos, sin, t_cos if noise else cos, t_sin if noise else sin, grad_q, per_dim,
            grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
            q.stride(0), q.stride(1), q.stride(2),
            L, H, H // ctx.num_kv_heads,
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_L=block_l, HALF=ctx.layout == "half", NOISE=noise, num_warps=4,
        )  # fmt: skip
        grad_theta = None
        if noise:  # both dimensions of a pair turn by the pair's angle
            if ctx.layout == "half":
                pair_sum = per_dim[:, : D // 2] + per_dim[:, D // 2 :]
            else:
                pair_sum = per_dim[:, 0::2] + per_dim[:, 1::2]
            grad_theta = pair_sum.to(theta.dtype)
        return grad_q, None, None, grad_theta, None, None
