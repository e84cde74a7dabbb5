"""A chunk's window extension and ring write in one pass (kernels/window_chunk.py) against its PyTorch reference:
chunks shorter than the window, as long, longer and not a multiple of it, at positions inside and at the start of
the stream, with the chunk's keys and values as strided views of a fused product."""

from __future__ import annotations

import pytest
import torch

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.window_chunk import extend_window, extend_window_reference

B, HKV, W, D = 2, 3, 32, 24  # a head size that is not a power of two: the masked tail


def _case(device: str, dtype: torch.dtype, n: int, pos_value: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ring = [torch.randn(B, HKV, W, D, generator=gen).to(device, dtype) for _ in range(2)]
    ring.append(torch.rand(B, HKV, W, generator=gen).to(device))
    fused = torch.randn(B, n, 2 * HKV * D + 5, generator=gen).to(device, dtype)  # k and v columns of one product
    k = fused[..., : HKV * D].view(B, n, HKV, D).transpose(1, 2)
    v = fused[..., HKV * D : 2 * HKV * D].view(B, n, HKV, D).transpose(1, 2)
    g = torch.rand(B, n, HKV, generator=gen).to(device).transpose(1, 2)
    pos = torch.tensor(pos_value, device=device)
    offsets = torch.arange(W, device=device)
    ours = [t.clone() for t in ring]
    theirs = [t.clone() for t in ring]
    got = extend_window(*ours, pos, k, v, g, offsets)
    want = extend_window_reference(*theirs, pos, k, v, g, offsets)
    names = ("ext_k", "ext_v", "ext_g", "ring_k", "ring_v", "ring_g")
    for name, a, b in zip(names, (*got, *ours), (*want, *theirs), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs (n={n}, pos={pos_value})"  # copies: exact
    assert got[0].is_contiguous() and got[2].dtype == torch.float32


CASES = [(1, 77), (8, 64), (8, 5), (32, 96), (48, 40), (64, 128), (64, 0)]


def test_the_kernel_matches_the_reference_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import window_chunk_triton

    assert "Interpreted" in type(window_chunk_triton._extend_window_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    for seed, (n, pos) in enumerate(CASES):
        _case("cpu", torch.float32, n, pos, seed)


def test_the_reference_is_the_window_then_the_chunk() -> None:
    """What the reference means: rows in token order, then the ring holds the chunk's last W tokens."""
    ring = [torch.arange(W, dtype=torch.float32).view(1, 1, W, 1).expand(1, 1, W, 2).clone() for _ in range(2)]
    ring.append(torch.arange(W, dtype=torch.float32).view(1, 1, W))
    n, pos = 40, torch.tensor(35)
    k = (100 + torch.arange(n, dtype=torch.float32)).view(1, 1, n, 1).expand(1, 1, n, 2)
    g = (100 + torch.arange(n, dtype=torch.float32)).view(1, 1, n)
    ext_k, _, ext_g = extend_window_reference(*ring, pos, k, k, g, torch.arange(W))
    # token p < 35 sat in slot p % W: the window holds tokens 3..34
    assert ext_g[0, 0, :W].tolist() == [float(p % W) for p in range(3, 35)]
    assert ext_k[0, 0, W:, 0].tolist() == [100.0 + j for j in range(n)]
    # tokens 35 + 8 .. 35 + 39 now fill the ring: token p in slot p % W
    assert ring[2][0, 0].tolist() == [100.0 + (p - 35) for p in sorted(range(43, 75), key=lambda p: p % W)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    for seed, (n, pos) in enumerate([*CASES, (1024, 1024 + 256)]):
        _case("cuda", dtype, n, pos, seed)
