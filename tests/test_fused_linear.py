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
