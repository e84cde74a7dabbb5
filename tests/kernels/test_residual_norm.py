"""The fused residual add + RMS norm (kernels/residual_norm.py) against transformers' own RMSNorm modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.residual_norm import add_rms_norm, add_rms_norm_reference, fusable


def _norm(cls: type, dim: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    norm = cls(dim, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm])
def test_the_reference_is_the_modules_own_computation(cls: type) -> None:
    torch.manual_seed(0)
    norm = _norm(cls, 96, "cpu", torch.bfloat16)
    h, delta = torch.randn(2, 5, 96, dtype=torch.bfloat16), torch.randn(2, 5, 96, dtype=torch.bfloat16)
    summed, normed = add_rms_norm_reference(h, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(summed, h + delta)
    assert torch.equal(normed, norm(h + delta))
    assert fusable(norm) and not fusable(torch.nn.LayerNorm(96))


@pytest.mark.parametrize("with_delta", [True, False])
def test_the_kernel_matches_the_module_in_the_interpreter(monkeypatch: pytest.MonkeyPatch, with_delta: bool) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import residual_norm_triton

    assert "Interpreted" in type(residual_norm_triton._add_rms_norm_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    torch.manual_seed(1)
    norm = _norm(LlamaRMSNorm, 576, "cpu", torch.float32)  # not a power of two: the masked tail
    h, delta = torch.randn(3, 7, 576), torch.randn(3, 7, 576)
    summed, normed = add_rms_norm(h, delta if with_delta else None, norm)
    expected_sum = h + delta if with_delta else h
    torch.testing.assert_close(summed, expected_sum, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(normed, norm(expected_sum), atol=2e-6, rtol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_module_on_the_gpu(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    norm = _norm(LlamaRMSNorm, 576, "cuda", dtype)
    h, delta = torch.randn(4, 33, 576, device="cuda", dtype=dtype), torch.randn(4, 33, 576, device="cuda", dtype=dtype)
    summed, normed = add_rms_norm(h, delta, norm)
    assert torch.equal(summed, h + delta)  # the same rounding of the same sum
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(normed, norm(h + delta), **tol)
