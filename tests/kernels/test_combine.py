"""The fused differential combine (signal - lambda * noise, head RMS norm, W_o layout) against
its PyTorch reference, forward and backward (interpreter in float32 on a CPU, bfloat16 on a GPU).
Inputs are fresh random draws each time."""

from __future__ import annotations

import os

import pytest
import torch

from coda_gqa_l.kernels import BACKEND_ENV
from coda_gqa_l.kernels.combine import combine_reference, differential_combine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def use_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "triton")


def _inputs(dtype: torch.dtype, head_dim: int, norm: bool) -> tuple[torch.Tensor, ...]:
    B, Hkv, G, L = 2, 2, 3, 37
    # the layouts the layer hands over: attention output viewed from (B, L, heads, Dh), lambda transposed
    attended = torch.randn(B, L, Hkv * 2 * G, head_dim, device=DEVICE).transpose(1, 2)
    attended = attended.reshape(B, Hkv, 2 * G, L, head_dim).to(dtype).requires_grad_()
    lam = torch.rand(B, L, Hkv * G, device=DEVICE).transpose(1, 2).requires_grad_()
    weight = (1 + 0.3 * torch.randn(Hkv * G, head_dim, device=DEVICE)).requires_grad_() if norm else None
    return attended, lam, weight


def _forward_backward(fn, attended, lam, weight, grad) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    leaves = [t for t in (attended, lam, weight) if t is not None]
    for t in leaves:
        t.grad = None
    out = fn(attended, lam, weight, 1e-6)
    out.backward(grad)
    return [out.detach().float(), *(t.grad.float() for t in leaves)]  # type: ignore[union-attr]


def test_interpreter_really_runs_on_cpu(use_triton: None) -> None:
    from coda_gqa_l.kernels import combine_triton

    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(combine_triton._combine_fwd_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("head_dim", [16, 24, 64])
def test_fused_combine_matches_reference(use_triton: None, norm: bool, head_dim: int) -> None:
    attended, lam, weight = _inputs(torch.float32, head_dim, norm)
    b, _, _, length, d = attended.shape
    grad = torch.randn(b, length, lam.shape[1] * d, device=DEVICE)
    ours = _forward_backward(differential_combine, attended, lam, weight, grad)
    reference = _forward_backward(combine_reference, attended, lam, weight, grad)
    labels = ["out", "d attended", "d lambda", "d gain"]
    for label, a, r in zip(labels, ours, reference, strict=False):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4, msg=lambda m, label=label: f"{label}: {m}")


def test_combine_shapes_are_named(use_triton: None) -> None:
    attended = torch.randn(1, 2, 4, 5, 8)
    with pytest.raises(ValueError, match="lam must be"):
        differential_combine(attended, torch.rand(1, 3, 5), None, 1e-6)
    with pytest.raises(ValueError, match="norm_weight must be"):
        differential_combine(attended, torch.rand(1, 4, 5), torch.ones(4, 4), 1e-6)
    with pytest.raises(ValueError, match="attended must be"):
        differential_combine(attended[:, :, :3], torch.rand(1, 3, 5), None, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [True, False])
def test_fused_combine_in_bfloat16(use_triton: None, norm: bool) -> None:
    """docs/kernels.md section 3: the kernel's error against a float64 truth at most twice the bf16 reference's."""
    attended, lam, weight = _inputs(torch.bfloat16, 64, norm)
    b, _, _, length, d = attended.shape
    grad = torch.randn(b, length, lam.shape[1] * d, device=DEVICE, dtype=torch.bfloat16)
    ours = _forward_backward(differential_combine, attended, lam, weight, grad)
    reference = _forward_backward(combine_reference, attended, lam, weight, grad)
    exact_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (attended, lam, weight)]
    truth = _forward_backward(combine_reference, *exact_inputs, grad.double())
    for a, r, t in zip(ours, reference, truth, strict=True):
        err, ref_err = (a.double() - t).norm().item(), (r.double() - t).norm().item()
        assert err <= 2 * ref_err + 1e-3 * t.norm().item(), (err, ref_err)


@pytest.mark.parametrize("head_norm", ["rms", "identity"])
def test_sdpa_path_of_the_layer_matches_the_reference(monkeypatch: pytest.MonkeyPatch, head_norm: str) -> None:
    """CODA_GQA_L_UNBOUNDED_ATTENTION=sdpa: the fused rotation, SDPA over the stacked queries and
    the fused combine, in a whole unbounded CoDA layer (training step and cached decoding)
    against the PyTorch path."""
    from coda_gqa_l import CoDAGQA
    from coda_gqa_l.kernels import UNBOUNDED_ENV

    layer = CoDAGQA(64, 4, 2, head_dim=16, head_norm=head_norm, lambda_init_bias=0.0).to(DEVICE)  # type: ignore[arg-type]
    x = torch.randn(2, 41, 64, device=DEVICE)
    grad = torch.randn(2, 41, 64, device=DEVICE)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.backward(grad)
        with torch.no_grad():  # a prefix in the cache: the fused kernel's path in either mode
            cache = layer.init_cache(2)
            decoded = torch.cat([layer(x[:, :20], cache), *(layer(x[:, t : t + 1], cache) for t in range(20, 41))], 1)
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}, decoded

    monkeypatch.setenv(BACKEND_ENV, "torch")
    reference = run()
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv(UNBOUNDED_ENV, "sdpa")
    from coda_gqa_l.kernels import combine, rope

    calls: list[str] = []
    fused_combine, fused_rotation = combine._FusedCombine.apply, rope._RotateStack.apply
    monkeypatch.setattr(combine._FusedCombine, "apply", lambda *a: calls.append("combine") or fused_combine(*a))
    monkeypatch.setattr(rope._RotateStack, "apply", lambda *a: calls.append("rotation") or fused_rotation(*a))
    ours = run()
    assert {"combine", "rotation"} <= set(calls), f"the fused kernels did not all run: {calls}"
    torch.testing.assert_close(ours[0], reference[0], atol=2e-5, rtol=1e-4)
    assert ours[1].keys() == reference[1].keys() and any("lambda" in n for n in ours[1])
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], atol=5e-5, rtol=1e-3, msg=name)
    torch.testing.assert_close(ours[2], reference[0], atol=5e-5, rtol=1e-4)
    monkeypatch.setenv(UNBOUNDED_ENV, "chunked")
    with pytest.raises(ValueError, match="CODA_GQA_L_UNBOUNDED_ATTENTION"):
        layer(x)
