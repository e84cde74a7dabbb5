"""One-row matrix products in one Triton kernel (kernels/row_product.py) against ``F.linear``: on the CPU in
Triton's interpreter in float32, on a GPU in bfloat16 at the folded SmolLM2's shapes, each within twice the error
of PyTorch's own product in that dtype against float64 (docs/kernels.md section 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.gated_activation import silu_and_mul
from coda_gqa_l.kernels.row_product import row_product, row_product_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels_on(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    with dispatch.row_product_kernels():
        yield


def _problem(rows_out: int, inputs: int, silu_mul: bool, bias: bool, dtype: torch.dtype, seed: int):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, inputs * (2 if silu_mul else 1), generator=gen) * 2
    weight = torch.randn(rows_out, inputs, generator=gen) / inputs**0.5
    b = torch.randn(rows_out, generator=gen) if bias else None
    to = dict(device=DEVICE, dtype=dtype)
    return x.to(**to), weight.to(**to), b.to(**to) if b is not None else None


def _check(x, weight, bias, silu_mul: bool) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        got = row_product(x, weight, bias, silu_mul=silu_mul)
        same = row_product_reference(x, weight, bias, silu_mul)
        exact = row_product_reference(x.double(), weight.double(), bias.double() if bias is not None else None,
                                      silu_mul)  # fmt: skip
    assert got.shape == same.shape and got.dtype == x.dtype
    err = (got.double() - exact).abs().max().item()
    ref_err = (same.double() - exact).abs().max().item()
    floor = (1e-6 if x.dtype == torch.float32 else 1e-2) * max(exact.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + floor, f"{err:.2e} against the reference's {ref_err:.2e}"


def test_the_interpreter_really_runs_the_kernel(kernels_on: None) -> None:
    if DEVICE == "cpu":
        from coda_gqa_l.kernels import row_product_triton

        assert "Interpreted" in type(row_product_triton._row_product_kernel).__name__


@pytest.mark.parametrize(
    "rows_out, inputs, silu_mul, bias",
    [(37, 300, False, True), (64, 256, False, False), (9, 520, True, False), (130, 96, True, True)],
)  # fmt: skip
def test_the_kernel_matches_the_product_in_float32(
    rows_out: int, inputs: int, silu_mul: bool, bias: bool, kernels_on: None
) -> None:
    """Row counts that leave a last block part empty, widths that leave a last stretch part empty."""
    x, weight, b = _problem(rows_out, inputs, silu_mul, bias, torch.float32, seed=int(torch.randint(0, 2**31, ())))
    _check(x, weight, b, silu_mul)


def test_off_by_default_and_for_several_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unless asked for, and for any input of more than one row, the product is the module's own (the activation's
    one-pass kernel, then ``F.linear``), bit for bit."""
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    x, weight, b = _problem(20, 64, True, True, torch.float32, seed=3)
    rows = x.expand(1, 3, 128).contiguous()
    with torch.no_grad():
        assert torch.equal(row_product(x, weight, b, silu_mul=True), F.linear(silu_and_mul(x), weight, b))
        with dispatch.row_product_kernels():
            several = row_product(rows, weight, b, silu_mul=True)
        assert torch.equal(several, F.linear(silu_and_mul(rows), weight, b))


def test_bad_shapes_and_dtypes_are_named(kernels_on: None) -> None:
    x, weight, _ = _problem(20, 64, False, False, torch.float32, seed=4)
    with torch.no_grad():
        with pytest.raises(
            ValueError, match="last dimension 64 does not match the gate and up halves of the weight's 64"
        ):
            row_product(x, weight, silu_mul=True)
        with pytest.raises(ValueError, match="last dimension 64 does not match the weight's 32 inputs"):
            row_product(x, weight[:, :32])
        with pytest.raises(ValueError, match="x is torch.float64 but the weight is torch.float32"):
            row_product(x.double(), weight)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows_out, inputs, silu_mul",
    [(972, 576, False), (576, 576, False), (3072, 576, False), (576, 1536, True)],
)  # fmt: skip
def test_the_kernel_matches_the_product_in_bfloat16(
    rows_out: int, inputs: int, silu_mul: bool, kernels_on: None
) -> None:
    """The folded SmolLM2's four products a layer: inputs (q, k, v, lambda, gate), output, gate-and-up, down."""
    x, weight, b = _problem(rows_out, inputs, silu_mul, False, torch.bfloat16, seed=int(torch.randint(0, 2**31, ())))
    _check(x, weight, b, silu_mul)
