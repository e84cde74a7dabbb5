"""Several linear maps as one product (fused_linear.py): the same outputs, the weights held once, and slices that
stand in for the originals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coda_gqa_l.fused_linear import LinearSlice, fusable_linears, fuse_linears


def _linears(dtype: torch.dtype = torch.float32) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [
        nn.Linear(24, 16, bias=False, dtype=dtype),
        nn.Linear(24, 8, bias=True, dtype=dtype),
        nn.Linear(24, 3, bias=True, dtype=dtype),
    ]


def test_the_fused_product_is_the_originals_side_by_side() -> None:
    originals = _linears()
    with torch.no_grad():
        for m in originals:
            if m.bias is not None:
                m.bias.normal_()
    x = torch.randn(2, 5, 24)
    expected = [m(x) for m in originals]
    fused, slices = fuse_linears(originals)
    assert fused.weight.shape == (27, 24)
    outputs = fused(x).split([16, 8, 3], dim=-1)
    for got, want, piece, original in zip(outputs, expected, slices, originals, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(piece(x), want, atol=1e-6, rtol=1e-6)  # a slice computes its original's map
        assert torch.equal(piece.weight, original.weight)
        assert (piece.bias is None) == (original.bias is None)
        assert piece.weight.data_ptr() >= fused.weight.data_ptr()  # a view of the fused weight, not a copy
        assert piece.out_features == original.out_features and piece.in_features == 24
    assert not list(slices[0].parameters())  # the weights are held once, by the fused module


def test_slices_follow_their_owner_across_moves_and_casts() -> None:
    fused, slices = fuse_linears(_linears())
    owner = nn.Module()
    owner.fused = fused
    owner.to(torch.float64)
    assert slices[1].weight.dtype == torch.float64 and slices[1].bias is not None
    assert slices[1].bias.dtype == torch.float64


def test_only_plain_linears_of_one_input_device_and_dtype_fuse() -> None:
    class Adapter(nn.Module):  # an adapter in front of a projection is not a plain nn.Linear
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(24, 8)

    assert fusable_linears(_linears())
    assert not fusable_linears([])
    assert not fusable_linears([_linears()[0], Adapter()])
    assert not fusable_linears([nn.Linear(24, 8), nn.Linear(12, 8)])
    assert not fusable_linears([nn.Linear(24, 8), nn.Linear(24, 8, dtype=torch.float64)])
    assert not fusable_linears([LinearSlice(nn.Linear(24, 8), 0, 4, True), nn.Linear(24, 8)])  # fused already
    with pytest.raises(ValueError, match="plain nn.Linear"):
        fuse_linears([nn.Linear(24, 8), nn.Linear(12, 8)])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_keys_then_queries_give_what_the_inputs_projection_gives(qk_norm: bool) -> None:
    """``project_keys`` then ``project_queries`` (a chunk's routing launched between them) give ``project_inputs``'s
    queries, keys, values, lambda and write gate; a fused layer is told to use its one product."""
    from coda_gqa_l import BoundedCoDAAttention, BoundedConfig

    torch.manual_seed(0)
    config = BoundedConfig(window=16, num_landmarks_exact=4, num_landmarks_summary=2)
    layer = BoundedCoDAAttention(64, 4, 2, config=config, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # lambda's scale and the norms' weights off their initial values
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        q, k, v, lam, g = layer.project_inputs(x)
        k2, v2, g2 = layer.project_keys(x)
        q2, lam2 = layer.project_queries(x)
    assert lam is not None and lam2 is not None
    for name, ours, theirs in (("q", q2, q), ("k", k2, k), ("v", v2, v), ("lambda", lam2, lam), ("g", g2, g)):
        assert ours.shape == theirs.shape, name
        assert torch.equal(ours, theirs), name  # the same products, launched in another order
    assert layer.fuse_input_projections()
    with pytest.raises(ValueError, match="not fused; use project_inputs"):
        layer.project_keys(x)
    with pytest.raises(ValueError, match="not fused; use project_inputs"):
        layer.project_queries(x)
