"""Several linear maps of the same input as one matrix product, for inference (a launch-bound decode step).

``fuse_linears`` stacks the weights of ``nn.Linear`` modules that read the same input into one ``nn.Linear`` and
returns ``LinearSlice`` stand-ins for the originals: each reads its rows of the fused weight (a view: the weights
are held once), so code that calls or inspects the original modules (``q_proj.weight.device``, ``gate_proj(x)``)
keeps working, while the owner runs one product where it used to run several. The slices hold no parameters of their
own: train or save weights from a model that was never fused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearSlice(nn.Module):
    """Rows ``start .. stop - 1`` of a fused ``nn.Linear``, standing in for the ``nn.Linear`` they came from."""

    _source: nn.Linear

    def __init__(self, source: nn.Linear, start: int, stop: int, has_bias: bool) -> None:
        super().__init__()
        # not a submodule: the fused projection is registered once, by its owner
        object.__setattr__(self, "_source", source)
        self.start, self.stop, self.has_bias = start, stop, has_bias
        self.in_features, self.out_features = source.in_features, stop - start

    @property
    def weight(self) -> Tensor:
        source: nn.Linear = self._source
        return source.weight[self.start : self.stop]

    @property
    def bias(self) -> Tensor | None:
        source: nn.Linear = self._source
        bias: Tensor | None = source.bias
        return bias[self.start : self.stop] if self.has_bias and bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.start}..{self.stop - 1}"


def fusable_linears(linears: Sequence[nn.Module]) -> bool:
    """Whether ``fuse_linears`` can stack these: plain ``nn.Linear`` (not adapters) of one input size, device and
    dtype."""
    if not linears or not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0]
    assert isinstance(first, nn.Linear)
    return all(
        m.in_features == first.in_features
        and m.weight.device == first.weight.device
        and m.weight.dtype == first.weight.dtype
        for m in linears
        if isinstance(m, nn.Linear)
    )


def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[nn.Linear, list[LinearSlice]]:
    """One ``nn.Linear`` computing ``cat([m(x) for m in linears], -1)``, and a ``LinearSlice`` per original (in
    order). Biases the originals lack are zeros in the fused bias. Needs ``fusable_linears(linears)``."""
    if not fusable_linears(linears):
        raise ValueError("fuse_linears takes plain nn.Linear modules of one input size, device and dtype")
    first = linears[0]
    total = sum(m.out_features for m in linears)
    any_bias = any(m.bias is not None for m in linears)
    fused = nn.Linear(first.in_features, total, bias=any_bias, device=first.weight.device, dtype=first.weight.dtype)
    slices, start = [], 0
    with torch.no_grad():
        for m in linears:
            stop = start + m.out_features
            fused.weight[start:stop].copy_(m.weight)
            if fused.bias is not None:
                fused.bias[start:stop].copy_(m.bias if m.bias is not None else torch.zeros_like(fused.bias[start:stop]))
            slices.append(LinearSlice(fused, start, stop, m.bias is not None))
            start = stop
    fused.requires_grad_(False)  # inference only (module docstring)
    return fused, slices
