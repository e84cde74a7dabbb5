"""Each segment's sinks and bank snapshot as the attention reads them, built in one pass (kernels/segment_extras.py)
against its PyTorch reference: with and without sinks and banks, rotated (both RoPE layouts) or not, a head size that
is not a power of two, and the extras the layer built before the one-pass kernel."""

from __future__ import annotations

import pytest
import torch

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.segment_extras import build_extras, build_extras_reference
from coda_gqa_l.primitives import RotaryEmbedding

B, HKV, D, NSEG = 2, 3, 24, 4


def _case(device: str, dtype: torch.dtype, ns: int, m: int, layout: str, rotate: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    sink_k, sink_v = rand(B, HKV, ns, D), rand(B, HKV, ns, D)
    bank_k, bank_v = rand(B, HKV, NSEG, m, D), rand(B, HKV, NSEG, m, D)
    bank_bias = torch.rand(B, HKV, NSEG, m, generator=gen).log().to(device)
    sink_angles = bank_angles = None
    if rotate:
        rope = RotaryEmbedding(D, base=10000.0, layout=layout).to(device)  # type: ignore[arg-type]
        starts = torch.arange(NSEG, device=device) * 8 + 40
        bank_angles = rope.cos_sin(starts - 32, torch.float32)
        positions = torch.maximum(
            torch.arange(ns, device=device), starts[:, None] - 32 - ns + torch.arange(ns, device=device)
        )
        cos, sin = rope.cos_sin(positions.reshape(-1), torch.float32)
        sink_angles = (cos.view(NSEG, ns, D), sin.view(NSEG, ns, D))
    got = build_extras(sink_k, sink_v, bank_k, bank_v, bank_bias, dtype, sink_angles, bank_angles, layout)  # type: ignore[arg-type]
    want = build_extras_reference(sink_k, sink_v, bank_k, bank_v, bank_bias, dtype, sink_angles, bank_angles, layout)  # type: ignore[arg-type]
    for name, a, b in zip(("keys", "values", "bias"), got, want, strict=True):
        assert a.shape == b.shape == (B, HKV, NSEG, ns + m, *([D] if name != "bias" else [])), name
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda s, name=name: f"{name}: {s}")  # same arithmetic
    assert torch.equal(got[2][..., :ns], torch.zeros_like(got[2][..., :ns]))  # the sinks' offsets are zero


CASES = [(3, 5, "half", True), (3, 5, "interleaved", True), (0, 5, "half", True), (3, 0, "half", True),
         (4, 33, "half", False)]  # fmt: skip


def test_the_kernel_matches_the_reference_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import segment_extras_triton

    assert "Interpreted" in type(segment_extras_triton._segment_extras_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    for seed, (ns, m, layout, rotate) in enumerate(CASES):
        _case("cpu", torch.float32, ns, m, layout, rotate, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    for seed, (ns, m, layout, rotate) in enumerate([*CASES, (4, 124, "half", True)]):
        _case("cuda", dtype, ns, m, layout, rotate, seed)
