"""The decode step's products with the residual norm or the gated activation in their prologue
(kernels/step_products.py) against the separate computations they replace."""

from __future__ import annotations

import pytest
import torch

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.step_products import (
    activated_product,
    activated_product_reference,
    norm_product,
    norm_product_reference,
)


def _inputs(width: int, rows: int, device: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {
        "h": rand(1, 1, width, scale=3.0),
        "delta": rand(1, 1, width),
        "norm_weight": (torch.rand(width, generator=gen) + 0.5).to(device=device, dtype=dtype),
        "weight": rand(rows, width, scale=width**-0.5),
        "bias": rand(rows),
        "gate_up": rand(1, 1, 2 * width, scale=2.0),
    }


def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import step_products_triton

    assert "Interpreted" in type(step_products_triton._step_product_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")


# 576: SmolLM2's width (a masked tail in one stretch); 2304: two stretches of 2048 (the loop and its tail).
# 37 and 2050 output rows: a last program with masked rows, at both row blocks
@pytest.mark.parametrize("width, rows", [(576, 37), (2304, 2050)])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_norm_product_matches_the_norm_then_the_product(
    monkeypatch: pytest.MonkeyPatch, width: int, rows: int, with_delta: bool, with_bias: bool
) -> None:
    _interpreter(monkeypatch)
    t = _inputs(width, rows, "cpu", torch.float32, seed=width + rows)
    delta, bias = (t["delta"] if with_delta else None), (t["bias"] if with_bias else None)
    expected_h, expected = norm_product_reference(t["h"], delta, t["norm_weight"], 1e-5, t["weight"], bias)
    h, y = norm_product(t["h"], delta, t["norm_weight"], 1e-5, t["weight"], bias)
    assert torch.equal(h, expected_h)  # the new residual: the same rounding of the same sum
    assert y.shape == (1, 1, rows)
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("width, rows", [(1536, 576), (2304, 37)])
def test_activated_product_matches_the_activation_then_the_product(
    monkeypatch: pytest.MonkeyPatch, width: int, rows: int
) -> None:
    _interpreter(monkeypatch)
    t = _inputs(width, rows, "cpu", torch.float32, seed=width)
    y = activated_product(t["gate_up"], t["weight"], t["bias"])
    torch.testing.assert_close(
        y, activated_product_reference(t["gate_up"], t["weight"], t["bias"]), atol=2e-5, rtol=2e-5
    )


def test_more_than_one_row_or_a_gradient_takes_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton" if dispatch.interpreting() else "torch")
    from coda_gqa_l.kernels import step_products

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(step_products, "_launch", refuse)
    t = _inputs(64, 8, "cpu", torch.float32, seed=5)
    two_rows = torch.cat([t["h"], t["h"]], dim=1)
    _, y = norm_product(two_rows, None, t["norm_weight"], 1e-6, t["weight"])
    assert torch.equal(y, norm_product_reference(two_rows, None, t["norm_weight"], 1e-6, t["weight"])[1])
    weight = t["weight"].clone().requires_grad_(True)
    y = activated_product(t["gate_up"], weight)
    y.sum().backward()
    assert weight.grad is not None
    gain = t["norm_weight"].clone().requires_grad_(True)  # a trainable norm before a frozen product
    _, y = norm_product(t["h"], t["delta"], gain, 1e-6, t["weight"])
    y.sum().backward()
    assert gain.grad is not None


def test_bad_shapes_and_dtypes_are_named() -> None:
    t = _inputs(64, 8, "cpu", torch.float32, seed=6)
    with pytest.raises(ValueError, match=r"weight \(8, 64\) must be \(out_features, 32\)"):
        activated_product(t["gate_up"][..., :64], t["weight"])
    with pytest.raises(ValueError, match="gate and up halves"):
        activated_product(t["gate_up"][..., :63], t["weight"])
    with pytest.raises(ValueError, match="delta"):
        norm_product(t["h"], t["delta"][..., :32], t["norm_weight"], 1e-6, t["weight"])
    with pytest.raises(ValueError, match="norm's weight"):
        norm_product(t["h"], None, t["norm_weight"].double(), 1e-6, t["weight"])
    with pytest.raises(ValueError, match="the input is torch.float32 but the weight is torch.bfloat16"):
        norm_product(t["h"], None, t["norm_weight"], 1e-6, t["weight"].bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("width, rows", [(576, 1350), (576, 3072), (1536, 576)])
def test_bfloat16_products_are_as_close_to_float64_as_the_separate_kernels(width: int, rows: int) -> None:
    """On the GPU in bfloat16 the product sums in another order than cuBLAS: its error against a float64 product
    of the same rounded input row stays within twice cuBLAS's (plus a floor of a few bfloat16 steps)."""
    t = _inputs(width, rows, "cuda", torch.bfloat16, seed=rows)
    h, y = norm_product(t["h"], t["delta"], t["norm_weight"], 1e-5, t["weight"], t["bias"])
    ref_h, ref_y = norm_product_reference(t["h"], t["delta"], t["norm_weight"], 1e-5, t["weight"], t["bias"])
    assert torch.equal(h, ref_h)
    from coda_gqa_l.kernels.residual_norm import add_rms_norm_reference

    _, normed = add_rms_norm_reference(t["h"], t["delta"], t["norm_weight"], 1e-5)
    truth = torch.nn.functional.linear(normed.double(), t["weight"].double(), t["bias"].double())
    assert (y.double() - truth).abs().max() <= 2 * (ref_y.double() - truth).abs().max() + 1e-2
    down = t["weight"][:, : width // 2].contiguous() if width % 2 == 0 else t["weight"]
    gate_up = t["gate_up"][..., :width]
    y = activated_product(gate_up, down, t["bias"])
    ref = activated_product_reference(gate_up, down, t["bias"])
    from coda_gqa_l.kernels.gated_activation import silu_and_mul_reference

    truth = torch.nn.functional.linear(silu_and_mul_reference(gate_up).double(), down.double(), t["bias"].double())
    assert (y.double() - truth).abs().max() <= 2 * (ref.double() - truth).abs().max() + 1e-2
