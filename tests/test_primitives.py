"""RoPE (both layouts, scaling types), norms, repeat_kv and the noise rotation."""

from __future__ import annotations

import math

import pytest
import torch

from coda_gqa_l import HeadwiseRMSNorm, RotaryEmbedding, apply_rope, repeat_kv
from coda_gqa_l.primitives import expand_pairs

F64 = torch.float64


def _half_to_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Reorder dims so that half-layout pair (i, i + D/2) becomes interleaved pair (2i, 2i+1)."""
    first, second = x.chunk(2, -1)
    return torch.stack([first, second], -1).flatten(-2)


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_layouts_rotate_the_same_pairs(head_dim: int) -> None:
    positions = torch.arange(50)
    x = torch.randn(3, 50, head_dim, dtype=F64)
    half = RotaryEmbedding(head_dim, 100000.0, "half")
    inter = RotaryEmbedding(head_dim, 100000.0, "interleaved")
    out_half = apply_rope(x, *half.cos_sin(positions, torch.float64), "half")
    out_inter = apply_rope(_half_to_interleaved(x), *inter.cos_sin(positions, torch.float64), "interleaved")
    assert torch.allclose(_half_to_interleaved(out_half), out_inter, atol=1e-12)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_scores_depend_on_distance_only(layout: str) -> None:
    rope = RotaryEmbedding(32, 10000.0, layout)
    q, k = torch.randn(32, dtype=F64), torch.randn(32, dtype=F64)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope.cos_sin(torch.tensor(m), torch.float64)
        ck, sk = rope.cos_sin(torch.tensor(n), torch.float64)
        return (apply_rope(q, cq, sq, layout) * apply_rope(k, ck, sk, layout)).sum()

    assert torch.allclose(score(7, 3), score(1007, 1003), atol=1e-9)
    assert torch.allclose(score(123456, 123000), score(456, 0), atol=1e-8)
    assert not torch.allclose(score(7, 3), score(9, 3))


def test_rope_base_is_used() -> None:
    a, b = RotaryEmbedding(64, 10000.0), RotaryEmbedding(64, 100000.0)
    assert not torch.allclose(a.inv_freq, b.inv_freq)
    assert torch.allclose(b.inv_freq[1], torch.tensor(100000.0 ** (-2 / 64), dtype=torch.float64))


def test_llama3_scaling() -> None:
    scaling = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    plain = RotaryEmbedding(128, 500000.0)
    scaled = RotaryEmbedding(128, 500000.0, scaling=scaling)
    wavelen = 2 * math.pi / plain.inv_freq
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert torch.allclose(scaled.inv_freq[high], plain.inv_freq[high])
    assert torch.allclose(scaled.inv_freq[low], plain.inv_freq[low] / 8)
    middle = ~high & ~low
    assert middle.any()
    assert (
        (scaled.inv_freq[middle] < plain.inv_freq[middle]) & (scaled.inv_freq[middle] > plain.inv_freq[middle] / 8)
    ).all()
    assert scaled.attention_scaling == 1.0


def test_yarn_scaling() -> None:
    scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)
    plain = RotaryEmbedding(128, 1000000.0)
    scaled = RotaryEmbedding(128, 1000000.0, scaling=scaling)
    assert scaled.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert torch.allclose(scaled.inv_freq[0], plain.inv_freq[0])  # highest frequency kept
    assert torch.allclose(scaled.inv_freq[-1], plain.inv_freq[-1] / 4)  # lowest interpolated
    cos, _ = scaled.cos_sin(torch.tensor([0]))
    assert torch.allclose(cos.double(), torch.full_like(cos.double(), scaled.attention_scaling), atol=1e-6)


def test_linear_scaling_and_unsupported_types() -> None:
    plain = RotaryEmbedding(16, 10000.0)
    linear = RotaryEmbedding(16, 10000.0, scaling={"type": "linear", "factor": 2.0})
    assert torch.allclose(linear.inv_freq, plain.inv_freq / 2)
    for kind in ("dynamic", "longrope"):
        with pytest.raises(ValueError, match="not supported"):
            RotaryEmbedding(16, 10000.0, scaling={"rope_type": kind, "factor": 2.0})
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(15)


def test_large_positions_keep_precision() -> None:
    rope = RotaryEmbedding(64, 10000.0)
    cos, sin = rope.cos_sin(torch.tensor([10_000_000]), torch.float32)
    angle = 10_000_000 * rope.inv_freq
    assert torch.allclose(cos[0, :32].double(), angle.cos(), atol=1e-6)
    assert torch.allclose(sin[0, :32].double(), angle.sin(), atol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_noise_rotation_commutes_with_rope(layout: str) -> None:
    rope = RotaryEmbedding(16, 10000.0, layout)
    theta = torch.rand(8, dtype=F64)
    rc, rs = expand_pairs(theta.cos(), theta.sin(), layout)
    cos, sin = rope.cos_sin(torch.arange(5), torch.float64)
    q = torch.randn(5, 16, dtype=F64)
    a = apply_rope(apply_rope(q, cos, sin, layout), rc, rs, layout)
    b = apply_rope(apply_rope(q, rc, rs, layout), cos, sin, layout)
    assert torch.allclose(a, b, atol=1e-12)


def test_headwise_rmsnorm() -> None:
    norm = HeadwiseRMSNorm(3, 8).double()
    x = torch.randn(2, 3, 5, 8, dtype=F64) * 7
    y = norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(2, 3, 5, dtype=F64), atol=1e-4)
    with torch.no_grad():
        norm.weight[1] = 2.0
    assert torch.allclose(norm(x)[:, 1], 2 * y[:, 1])
    with pytest.raises(ValueError, match="expects"):
        norm(torch.randn(2, 4, 5, 8, dtype=F64))


def test_repeat_kv() -> None:
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))
    assert repeat_kv(x, 1) is x
