"""The gated MLP's activation in one pass (kernels/gated_activation.py) against the module's own computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.gated_activation import (
    gate_sigmoid,
    gate_sigmoid_reference,
    silu_and_mul,
    silu_and_mul_reference,
)


def test_the_reference_is_the_modules_computation() -> None:
    torch.manual_seed(0)
    gate_up = torch.randn(3, 5, 2 * 96, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul_reference(gate_up), ACT2FN["silu"](gate) * up)


def test_the_kernel_matches_the_reference_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import gated_activation_triton

    assert "Interpreted" in type(gated_activation_triton._silu_and_mul_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    torch.manual_seed(1)
    gate_up = torch.randn(2, 3, 2 * 1100) * 4  # wider than a block: the masked tail of a second block
    with torch.no_grad():
        got = silu_and_mul(gate_up)
    torch.testing.assert_close(got, silu_and_mul_reference(gate_up), atol=1e-6, rtol=1e-6)


def test_an_odd_width_is_refused() -> None:
    with pytest.raises(ValueError, match="gate and up halves"):
        silu_and_mul(torch.randn(2, 7))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_module_on_the_gpu(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    gate_up = torch.randn(4, 33, 2 * 1536, device="cuda", dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.no_grad():
        got = silu_and_mul(gate_up)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(got, F.silu(gate) * up, **tol)


def _gate_columns(device: str, dtype: torch.dtype) -> torch.Tensor:
    """A column slice of a fused product's output, as ``project_inputs`` takes its gate logits: (B, n, 12) views
    of a (B, n, 972) tensor."""
    gen = torch.Generator().manual_seed(3)
    fused = (torch.randn(2, 5, 972, generator=gen) * 3).to(device, dtype)
    return fused[..., 960:]


def test_gate_sigmoid_matches_the_reference_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import gated_activation_triton

    assert "Interpreted" in type(gated_activation_triton._gate_sigmoid_kernel).__name__
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    for logits in (_gate_columns("cpu", torch.float32), _gate_columns("cpu", torch.float32)[:, :1]):
        with torch.no_grad():
            got = gate_sigmoid(logits)
        assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == logits.shape
        torch.testing.assert_close(got, gate_sigmoid_reference(logits), atol=1e-6, rtol=1e-6)
    transposed = _gate_columns("cpu", torch.float32).transpose(0, 1)  # rows of two strides: copied first
    with torch.no_grad():
        torch.testing.assert_close(gate_sigmoid(transposed), gate_sigmoid_reference(transposed), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_sigmoid_matches_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    logits = _gate_columns("cuda", dtype)
    with torch.no_grad():
        got = gate_sigmoid(logits)
    torch.testing.assert_close(got, gate_sigmoid_reference(logits), atol=1e-6, rtol=1e-6)
