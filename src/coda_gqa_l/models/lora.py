"""Low-rank adapters (LoRA) on the q/k/v/o projections of converted attention layers.

``LoRALinear`` keeps the frozen base ``nn.Linear`` and adds ``(alpha / rank) * B(A(x))``; ``B``
starts at zero, so adding adapters never changes the model's outputs until it trains.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..models.adapters import CoDAAttentionAdapter

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_b(lora_a(x))`` with ``scale = alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    # the wrapped layer's attributes that callers read (our layers read .weight for device/dtype)
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        low = nn.functional.linear(nn.functional.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scale * low


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0) -> int:
    """Wrap the q/k/v/o projections of every converted attention layer; returns how many were wrapped."""
    wrapped = 0
    for adapter in (m for m in model.modules() if isinstance(m, CoDAAttentionAdapter)):
        core = getattr(adapter.layer, "core", adapter.layer)
        for name in PROJECTIONS:
            linear = getattr(core, name, None)
            if isinstance(linear, LoRALinear):
                raise ValueError(f"layer {adapter.layer_idx} already has LoRA on {name}")
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"layer {adapter.layer_idx} has no nn.Linear {name} to adapt")
            setattr(core, name, LoRALinear(linear, rank, alpha))
            wrapped += 1
    if not wrapped:
        raise ValueError("no converted attention layer found: call coda_gqa_l.convert(model, ...) first")
    return wrapped


def lora_settings(model: nn.Module) -> dict[str, float] | None:
    """``{"rank", "alpha"}`` of the model's adapters, or None when it has none."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            return {"rank": module.rank, "alpha": module.alpha}
    return None


# set on a model whose adapters were merged or whose products were fused (models/inference.py): its parameters no
# longer split into base weights and adapters, so save_coda_weights refuses it
INFERENCE_ONLY = "_coda_gqa_l_inference_only"


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base projection: ``W + scale * B A`` in one ``nn.Linear``; returns how many.

    For inference only: the merged model computes the same function (to rounding: the sum is formed in float32, then
    cast to the weights' dtype) with one matrix product per projection instead of three and two elementwise
    kernels, which matters where a decode step is launch-bound (a CUDA graph of the whole model replays every
    kernel). The adapters are gone afterwards: train or save CoDA weights from an unmerged model.
    """
    merged = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, LoRALinear):
                continue
            base = child.base
            linear = nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None,
                device=base.weight.device, dtype=base.weight.dtype,
            )  # fmt: skip
            with torch.no_grad():
                delta = child.scale * (child.lora_b.float() @ child.lora_a.float())
                linear.weight.copy_(base.weight.float() + delta)
                if base.bias is not None:
                    linear.bias.copy_(base.bias)
            linear.requires_grad_(base.weight.requires_grad)
            setattr(parent, name, linear)
            merged += 1
    if merged:
        setattr(model, INFERENCE_ONLY, True)
    return merged
