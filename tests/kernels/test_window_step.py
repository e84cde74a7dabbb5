"""A graph decoder's step into its window (kernels/window_step.py) against its PyTorch reference, and the attention
kernel reading a segment's window buffer (``SEGMENT_WINDOW``) against the same keys in token order."""

from __future__ import annotations

import pytest
import torch
from helpers import window_step_targets

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.diff_attention import SEGMENT_WINDOW, Pattern, fused_attention
from coda_gqa_l.kernels.window_step import (
    WindowStep,
    WindowTargets,
    write_window_step,
    write_window_step_reference,
)
from coda_gqa_l.primitives import RotaryEmbedding, apply_rope

B, HKV, W, S, D = 2, 3, 32, 8, 24  # a head size that is not a power of two: the masked tail


def _targets(device: str, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    return window_step_targets(B, HKV, W, D, device, dtype, seed)


def _check_against_reference(device: str, dtype: torch.dtype, layout: str, rotate: bool, tol: float) -> None:
    gen = torch.Generator().manual_seed(7)
    rope = RotaryEmbedding(D, base=10000.0, layout=layout).to(device)  # type: ignore[arg-type]
    for pos_value in (77, 80, 95):  # inside a segment, its first token, its last
        pos = torch.tensor(pos_value, device=device)
        cos, sin = rope.cos_sin(pos.view(1), torch.float32) if rotate else (None, None)
        step = WindowStep(
            torch.randn(B, HKV, 1, D, generator=gen).to(device, dtype),
            torch.randn(B, HKV, 1, D, generator=gen).to(device, dtype),
            torch.rand(B, HKV, 1, generator=gen).to(device),
            cos,
            sin,
        )
        ours = _targets(device, dtype, pos_value)
        expected = [t.clone() for t in ours]
        write_window_step(step, WindowTargets(*ours), pos, S, layout)  # type: ignore[arg-type]
        write_window_step_reference(step, WindowTargets(*expected), pos, S, layout)  # type: ignore[arg-type]
        for got, want in zip(ours, expected, strict=True):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        slot, at = pos_value % W, W - S + pos_value % S
        assert torch.equal(ours[0][:, :, slot], step.k[:, :, 0].to(dtype))  # the ring keeps the key as it came
        key = step.k.float() if cos is None else apply_rope(step.k.float(), cos, sin, layout)  # type: ignore[arg-type]
        torch.testing.assert_close(ours[4][:, :, at], key[:, :, 0].to(dtype), atol=tol, rtol=tol)
        assert torch.equal(ours[3], torch.full((B,), 78, dtype=torch.int64, device=device))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotate", [True, False])
def test_the_kernel_matches_the_reference_in_the_interpreter(
    monkeypatch: pytest.MonkeyPatch, layout: str, rotate: bool
) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import window_step_triton

    assert "Interpreted" in type(window_step_triton._window_step_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    _check_against_reference("cpu", torch.float32, layout, rotate, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    _check_against_reference("cuda", dtype, "half", True, 1e-6 if dtype == torch.float32 else 1e-2)


def _segment_window_case(device: str, dtype: torch.dtype, pos_value: int) -> None:
    """The same query over the window in token order (``k_offset = W``) and over the segment's window buffer."""
    gen = torch.Generator().manual_seed(pos_value)
    Qs, E, Ns = 4, 5, 2
    pattern = Pattern(bounded=True, window=W, segment=S, num_sink=Ns)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, ext_k, ext_v = rand(B, HKV, Qs, 1, D), rand(B, HKV, W + 1, D), rand(B, HKV, W + 1, D)
    lam = torch.rand(B, HKV * Qs // 2, 1, generator=gen).to(device)
    extra_k, extra_v = rand(B, HKV, 1, E, D), rand(B, HKV, 1, E, D)
    extra_bias = torch.rand(B, HKV, 1, E, generator=gen).log().to(device)
    # the buffer: slot i is token b - W + S + i, i.e. ext index (b - W + S + i) - (pos - W); later slots are garbage
    b, r = pos_value - pos_value % S, pos_value % S
    known = W - S + r + 1
    buffer_k, buffer_v = rand(B, HKV, W, D) * 1e3, rand(B, HKV, W, D) * 1e3
    buffer_k[:, :, :known] = ext_k[:, :, S - r :]
    buffer_v[:, :, :known] = ext_v[:, :, S - r :]
    pos = torch.tensor(pos_value, device=device)
    common = dict(scale=D**-0.5, pattern=pattern, extra_k=extra_k, extra_v=extra_v, extra_bias=extra_bias)
    in_order = fused_attention(q, ext_k, ext_v, lam, q_start=pos, k_offset=W, **common)  # type: ignore[arg-type]
    buffered = fused_attention(
        q,
        buffer_k,
        buffer_v,
        lam,
        q_start=pos,
        k_offset=SEGMENT_WINDOW,
        **common,  # type: ignore[arg-type]
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(buffered, in_order, atol=tol, rtol=tol, msg=f"position {pos_value} (segment {b})")


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_attention_over_the_segment_window_buffer(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    if path == "triton":
        if not dispatch.interpreting():
            pytest.skip("the CPU check runs Triton's interpreter")
        monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    for pos_value in (3, 41, 48, 55, 200):  # among the sinks, mid-segment, a segment's first and last token, later
        _segment_window_case("cpu", torch.float32, pos_value)


@pytest.mark.gpu
def test_attention_over_the_segment_window_buffer_on_the_gpu() -> None:
    for pos_value in (3, 41, 48, 55, 200):
        _segment_window_case("cuda", torch.bfloat16, pos_value)


def test_the_segment_window_is_for_inference_and_the_bounded_pattern() -> None:
    q, k = torch.randn(1, 1, 2, 1, 8, requires_grad=True), torch.randn(1, 1, W, 8)
    lam = torch.rand(1, 1, 1)
    with pytest.raises(ValueError, match="bounded pattern"):
        fused_attention(q, k, k, lam, q_start=40, k_offset=SEGMENT_WINDOW, scale=1.0)
    with pytest.raises(ValueError, match="for inference"):
        fused_attention(q, k, k, lam, q_start=40, k_offset=SEGMENT_WINDOW, scale=1.0, pattern=Pattern(True, W, S, 0))
    with pytest.raises(ValueError, match="k_offset must be"):
        fused_attention(q.detach(), k, k, lam, q_start=40, k_offset=-3, scale=1.0)


def _step_and_targets(device: str) -> tuple[WindowStep, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    step = WindowStep(
        torch.randn(B, HKV, 1, D, generator=gen).to(device),
        torch.randn(B, HKV, 1, D, generator=gen).to(device),
        torch.rand(B, HKV, 1, generator=gen).to(device),
        None,
        None,
    )
    return step, _targets(device, torch.float32, 12)


def test_compile_ahead_is_off_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter has nothing to compile: inside ``compile_ahead`` kernels run as usual."""
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    step, targets = _step_and_targets("cpu")
    before = [t.clone() for t in targets]
    with dispatch.compile_ahead() as active:
        write_window_step(step, WindowTargets(*targets), torch.tensor(77), S, "half")
    assert not active
    assert not torch.equal(targets[0], before[0])  # the ring was written


@pytest.mark.gpu
def test_compile_ahead_compiles_without_writing() -> None:
    """On the GPU a launch inside ``compile_ahead`` compiles its kernel and writes nothing; the same launch after it
    writes what the reference writes (the graph decoders' warm-ups rely on both)."""
    step, targets = _step_and_targets("cuda")
    before = [t.clone() for t in targets]
    pos = torch.tensor(77, device="cuda")
    with dispatch.compile_ahead() as active:
        write_window_step(step, WindowTargets(*targets), pos, S, "half")
    assert active, "this Triton has no AsyncCompileMode: a fresh process compiles kernels one by one"
    assert all(torch.equal(t, b) for t, b in zip(targets, before, strict=True))
    expected = [t.clone() for t in before]
    write_window_step(step, WindowTargets(*targets), pos, S, "half")
    write_window_step_reference(step, WindowTargets(*expected), pos, S, "half")
    for got, want in zip(targets, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
