"""A graph decoder's plain step from its fused input product to the attention's inputs, in one pass.

Inside a segment a decode step (``decode.advance_at_device_position`` with ``reuse``) takes the layer's fused input
product (``BoundedCoDAAttention.fuse_input_projections``: queries, keys, values, lambda's and the write gate's logits
side by side), and then ran three kernels per layer: the gates' sigmoid (``gated_activation.gate_sigmoid``), the
token into the window ring and the segment's buffer (``window_step.write_window_step``) and the queries' rotation
and stacking (``rope.stack_rotated_queries``). On an H200 a step of SmolLM2 was 378 kernels of about 2.5 us each
(benchmarks/results/speed.md, "The split decode attention on an H200"): ``step_inputs`` is those three as one launch,
two kernels fewer per layer. ``step_inputs_reference`` composes the three references (the CPU, and what the kernel
is tested against). Both read the position on the device only, so the step can be captured once and replayed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..primitives import RopeLayout
from .dispatch import dependent_launch_meta, launch, tile_size, use_triton
from .gated_activation import gate_sigmoid_reference
from .rope import stack_rotated_queries_reference
from .window_step import WindowStep, WindowTargets, write_window_step_reference


def _split(fused: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fused (B, 1, H*Dh + 2*Hkv*Dh + H + Hkv)`` -> q ``(B, H, 1, Dh)``, k, v ``(B, Hkv, 1, Dh)`` and the logits
    of lambda ``(B, H, 1)`` and of the write gate ``(B, Hkv, 1)``, as views."""
    B, one, width = fused.shape
    head_dim = (width - num_heads - num_kv_heads) // (num_heads + 2 * num_kv_heads)
    if one != 1 or width != (num_heads + 2 * num_kv_heads) * head_dim + num_heads + num_kv_heads:
        raise ValueError(
            f"fused must be (B, 1, q + k + v + lambda + gate columns) for {num_heads} heads over {num_kv_heads} KV "
            f"heads, got {tuple(fused.shape)}"
        )
    wq, wkv = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v, logits = fused.split([wq, wkv, wkv, num_heads + num_kv_heads], dim=-1)
    q = q.view(B, 1, num_heads, head_dim).transpose(1, 2)
    k = k.view(B, 1, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(B, 1, num_kv_heads, head_dim).transpose(1, 2)
    logits = logits.transpose(1, 2)
    return q, k, v, logits[:, :num_heads], logits[:, num_heads:]


def step_inputs_reference(
    fused: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor, noise_cos: Tensor | None,
    noise_sin: Tensor | None, to: WindowTargets, pos: Tensor, segment: int, layout: RopeLayout,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One token's fused product row ``fused (B, 1, ...)`` -> the stacked rotated queries ``(B, Hkv, 2G or G, 1,
    Dh)`` and ``lambda = sigmoid(logits) (B, H, 1)`` float32; in place, the token written into the window as
    ``write_window_step_reference`` writes it (key before RoPE into the ring with its gate ``sigmoid(logits)``, key
    rotated at ``pos`` into the segment's buffer). ``cos, sin (1, Dh)`` float32 for ``pos``; ``noise_cos``,
    ``noise_sin (H, Dh)`` the noise rotation's tables (None: no noise heads)."""
    q, k, v, lam_logits, gate_logits = _split(fused, num_heads, num_kv_heads)
    lam, gate = gate_sigmoid_reference(lam_logits), gate_sigmoid_reference(gate_logits)
    write_window_step_reference(WindowStep(k, v, gate, cos, sin), to, pos, segment, layout)
    return stack_rotated_queries_reference(q, cos, sin, noise_cos, noise_sin, num_kv_heads, layout), lam


def step_inputs(
    fused: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor, noise_cos: Tensor | None,
    noise_sin: Tensor | None, to: WindowTargets, pos: Tensor, segment: int, layout: RopeLayout,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``step_inputs_reference`` in one Triton launch on the Triton backend (the targets contiguous, the fused row's
    last dimension of unit stride)."""
    if not use_triton(fused.device):
        return step_inputs_reference(
            fused, num_heads, num_kv_heads, cos, sin, noise_cos, noise_sin, to, pos, segment, layout
        )
    from .step_inputs_triton import _step_inputs_kernel

    q, _, _, _, _ = _split(fused, num_heads, num_kv_heads)
    B, _, _, D = q.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    W = to.ring_k.shape[2]
    if to.ring_k.shape != (B, num_kv_heads, W, D) or to.buffer_k.shape != to.ring_k.shape or W % segment:
        raise ValueError(
            f"ring {tuple(to.ring_k.shape)} and buffer {tuple(to.buffer_k.shape)} must be (B, Hkv, W, Dh) with W a "
            f"multiple of the segment ({segment})"
        )
    for name, t in vars(to).items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")
    if fused.stride(-1) != 1:
        fused = fused.contiguous()
    noise = noise_cos is not None and noise_sin is not None
    streams = 2 * (num_heads // num_kv_heads) if noise else num_heads // num_kv_heads
    stacked = torch.empty(B, num_kv_heads, streams, 1, D, device=fused.device, dtype=fused.dtype)
    lam = torch.empty(B, num_heads, 1, device=fused.device, dtype=torch.float32)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    tcos = noise_cos.float().contiguous() if noise and noise_cos is not None else cos
    tsin = noise_sin.float().contiguous() if noise and noise_sin is not None else sin
    launch(_step_inputs_kernel, (B * num_heads,),
        fused, cos, sin, tcos, tsin, pos, stacked, lam,
        to.ring_k, to.ring_v, to.ring_g, to.position, to.buffer_k, to.buffer_v,
        fused.stride(0), stacked.stride(0), stacked.stride(1), stacked.stride(2),
        num_heads, num_kv_heads, W, segment,
        HEAD_DIM=D, BLOCK_D=tile_size(D, least=2), HALF=layout == "half", NOISE=noise, num_warps=1,
        **dependent_launch_meta(fused.device),
    )  # fmt: skip
    return stacked, lam
