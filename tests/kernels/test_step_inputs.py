"""A graph decoder's plain step from its fused input product (kernels/step_inputs.py): the one-pass kernel against
its PyTorch reference, and the reference against the three operations it replaces (the gates' sigmoid, the window
step, the queries' rotation and stacking) as the step ran them before."""

from __future__ import annotations

import pytest
import torch
from helpers import window_step_targets

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.rope import stack_rotated_queries_reference
from coda_gqa_l.kernels.step_inputs import step_inputs, step_inputs_reference
from coda_gqa_l.kernels.window_step import WindowStep, WindowTargets, write_window_step_reference
from coda_gqa_l.primitives import RotaryEmbedding, expand_pairs

B, H, HKV, W, S, D = 2, 6, 2, 32, 8, 24  # a head size that is not a power of two: the masked tail
WIDTH = (H + 2 * HKV) * D + H + HKV


def _targets(device: str, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    return window_step_targets(B, HKV, W, D, device, dtype, seed)


def _noise_tables(layout: str, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.randn(H, D // 2, generator=gen)
    cos, sin = expand_pairs(angles.cos(), angles.sin(), layout)  # type: ignore[arg-type]
    return cos.to(device), sin.to(device)


def _check_against_reference(device: str, dtype: torch.dtype, layout: str, noise: bool, tol: float) -> None:
    gen = torch.Generator().manual_seed(11)
    rope = RotaryEmbedding(D, base=10000.0, layout=layout).to(device)  # type: ignore[arg-type]
    tcos, tsin = _noise_tables(layout, device, gen) if noise else (None, None)
    for pos_value in (77, 80, 95):  # inside a segment, its first token, its last
        pos = torch.tensor(pos_value, device=device)
        cos, sin = rope.cos_sin(pos.view(1), torch.float32)
        # a column slice of a wider product, as the model's fused linear may hand over: rows of a larger stride
        fused = (3 * torch.randn(B, 1, WIDTH + 5, generator=gen)).to(device, dtype)[..., :WIDTH]
        ours = _targets(device, dtype, pos_value)
        expected = [t.clone() for t in ours]
        stacked, lam = step_inputs(fused, H, HKV, cos, sin, tcos, tsin, WindowTargets(*ours), pos, S, layout)  # type: ignore[arg-type]
        want_stacked, want_lam = step_inputs_reference(
            fused,
            H,
            HKV,
            cos,
            sin,
            tcos,
            tsin,
            WindowTargets(*expected),
            pos,
            S,
            layout,  # type: ignore[arg-type]
        )
        assert stacked.shape == (B, HKV, 2 * H // HKV if noise else H // HKV, 1, D) and stacked.dtype == dtype
        torch.testing.assert_close(stacked, want_stacked, atol=tol, rtol=tol)
        torch.testing.assert_close(lam, want_lam, atol=1e-6, rtol=1e-6)
        for got, want in zip(ours, expected, strict=True):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        assert torch.equal(ours[3], torch.full((B,), 78, dtype=torch.int64, device=device))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("noise", [True, False])
def test_the_kernel_matches_the_reference_in_the_interpreter(
    monkeypatch: pytest.MonkeyPatch, layout: str, noise: bool
) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import step_inputs_triton

    assert "Interpreted" in type(step_inputs_triton._step_inputs_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    _check_against_reference("cpu", torch.float32, layout, noise, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    _check_against_reference("cuda", dtype, "half", True, 1e-6 if dtype == torch.float32 else 1e-2)


def test_the_reference_is_the_three_operations_it_replaces() -> None:
    """The product's columns read as ``project_inputs`` reads them: q, k, v, lambda's then the gate's logits."""
    gen = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(D, base=10000.0, layout="half")
    tcos, tsin = _noise_tables("half", "cpu", gen)
    pos = torch.tensor(83)
    cos, sin = rope.cos_sin(pos.view(1), torch.float32)
    fused = torch.randn(B, 1, WIDTH, generator=gen)
    ours, expected = _targets("cpu", torch.float32, 1), _targets("cpu", torch.float32, 1)
    stacked, lam = step_inputs_reference(fused, H, HKV, cos, sin, tcos, tsin, WindowTargets(*ours), pos, S, "half")

    wq, wkv = H * D, HKV * D
    q, k, v, logits = fused.split([wq, wkv, wkv, H + HKV], dim=-1)
    gates = torch.sigmoid(logits).transpose(1, 2)
    q = q.view(B, 1, H, D).transpose(1, 2)
    k = k.view(B, 1, HKV, D).transpose(1, 2)
    v = v.view(B, 1, HKV, D).transpose(1, 2)
    write_window_step_reference(WindowStep(k, v, gates[:, H:], cos, sin), WindowTargets(*expected), pos, S, "half")
    torch.testing.assert_close(lam, gates[:, :H])
    torch.testing.assert_close(stacked, stack_rotated_queries_reference(q, cos, sin, tcos, tsin, HKV, "half"))
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_product_of_the_wrong_width_is_refused() -> None:
    targets = WindowTargets(*_targets("cpu", torch.float32, 0))
    cos = sin = torch.ones(1, D)
    with pytest.raises(ValueError, match="q \\+ k \\+ v \\+ lambda \\+ gate columns"):
        step_inputs(torch.zeros(B, 1, WIDTH - 1), H, HKV, cos, sin, None, None, targets, torch.tensor(3), S, "half")
