"""The one-pass RoPE + noise rotation kernel against its PyTorch reference (interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

from coda_gqa_l.kernels.rope import rotate_keys, stack_rotated_queries, stack_rotated_queries_reference
from coda_gqa_l.primitives import RotaryEmbedding, apply_rope, expand_pairs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("head_dim", [12, 16, 64])
@pytest.mark.parametrize("noise", [True, False])
def test_stacked_rotation_matches_reference(layout: str, head_dim: int, noise: bool) -> None:
    B, H, Hkv, L = 2, 6, 2, 45
    rope = RotaryEmbedding(head_dim, 10000.0, layout).to(DEVICE)  # type: ignore[arg-type]
    # the projection's layout: (B, L, H, Dh) seen as (B, H, L, Dh)
    q = torch.randn(B, L, H, head_dim, device=DEVICE).transpose(1, 2)
    cos, sin = rope.cos_sin(1000 + torch.arange(L, device=DEVICE), torch.float32)
    theta = torch.rand(H, head_dim // 2, device=DEVICE) * 3
    t_cos, t_sin = expand_pairs(theta.cos(), theta.sin(), layout) if noise else (None, None)  # type: ignore[arg-type]
    ours = stack_rotated_queries(q, cos, sin, t_cos, t_sin, Hkv, layout)  # type: ignore[arg-type]
    reference = stack_rotated_queries_reference(q, cos, sin, t_cos, t_sin, Hkv, layout)  # type: ignore[arg-type]
    assert ours.shape == (B, Hkv, (2 if noise else 1) * H // Hkv, L, head_dim)
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=1e-5)


def test_rotate_keys_is_rope() -> None:
    rope = RotaryEmbedding(16, 500.0, "half").to(DEVICE)
    k = torch.randn(1, 3, 70, 16, device=DEVICE)
    cos, sin = rope.cos_sin(torch.arange(70, device=DEVICE) - 5, torch.float32)
    torch.testing.assert_close(rotate_keys(k, cos, sin, "half"), apply_rope(k, cos, sin, "half"), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("noise", [True, False])
def test_differentiable_rotation_matches_reference(monkeypatch: pytest.MonkeyPatch, layout: str, noise: bool) -> None:
    """rotate_and_stack (training's fused RoPE + noise rotation): forward and the gradients of the
    queries and of the noise angles against autograd through the PyTorch reference."""
    from coda_gqa_l.kernels import BACKEND_ENV
    from coda_gqa_l.kernels.rope import rotate_and_stack, rotate_and_stack_reference

    monkeypatch.setenv(BACKEND_ENV, "triton")
    B, H, Hkv, L, D = 2, 6, 2, 45, 16
    rope = RotaryEmbedding(D, 10000.0, layout).to(DEVICE)  # type: ignore[arg-type]
    cos, sin = rope.cos_sin(torch.arange(L, device=DEVICE), torch.float32)
    q = torch.randn(B, L, H, D, device=DEVICE).transpose(1, 2).requires_grad_()
    theta = (torch.rand(H, D // 2, device=DEVICE) * 3).requires_grad_() if noise else None
    streams = (2 if noise else 1) * H // Hkv
    grad = torch.randn(B, Hkv, streams, L, D, device=DEVICE)
    results = []
    for fn in (rotate_and_stack, rotate_and_stack_reference):
        leaves = [t for t in (q, theta) if t is not None]
        out = fn(q, cos, sin, theta, Hkv, layout)  # type: ignore[arg-type]
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
    for label, ours, reference in zip(["out", "d q", "d theta"], *results, strict=False):
        torch.testing.assert_close(ours, reference, atol=5e-5, rtol=1e-4, msg=lambda m, label=label: f"{label}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_differentiable_rotation_in_bfloat16(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Training's dtype: bfloat16 queries, float32 noise angles, against the float32 reference
    on the same (rounded) inputs, with bfloat16 tolerances."""
    from coda_gqa_l.kernels import BACKEND_ENV
    from coda_gqa_l.kernels.rope import rotate_and_stack, rotate_and_stack_reference

    monkeypatch.setenv(BACKEND_ENV, "triton")
    B, H, Hkv, L, D = 2, 8, 4, 300, 64
    rope = RotaryEmbedding(D, 10000.0, layout).to(DEVICE)  # type: ignore[arg-type]
    cos, sin = rope.cos_sin(torch.arange(L, device=DEVICE), torch.float32)
    q16 = torch.randn(B, L, H, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    theta = (torch.rand(H, D // 2, device=DEVICE) * 3).requires_grad_()
    grad = torch.randn(B, Hkv, 2 * H // Hkv, L, D, device=DEVICE)
    ours = rotate_and_stack(q16, cos, sin, theta, Hkv, layout)  # type: ignore[arg-type]
    assert ours.dtype == torch.bfloat16
    d_q, d_theta = torch.autograd.grad(ours, [q16, theta], grad.to(ours.dtype))
    q32 = q16.detach().float().requires_grad_()
    reference = rotate_and_stack_reference(q32, cos, sin, theta, Hkv, layout)  # type: ignore[arg-type]
    ref_q, ref_theta = torch.autograd.grad(reference, [q32, theta], grad)
    torch.testing.assert_close(ours.float(), reference, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(d_q.float(), ref_q, atol=3e-2, rtol=2e-2)
    # d theta sums B*L products per angle: compare relative to its scale
    assert (d_theta - ref_theta).abs().max() <= 2e-2 * ref_theta.abs().max()
