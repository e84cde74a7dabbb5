"""A converted model folded for inference: fewer, larger matrix products per token.

A decode step of a small model is launch-bound (a CUDA graph replays every kernel; on the CPU each product has its
own overhead), so the model that only reads gets its products merged where the function allows:

* LoRA adapters folded into their projections (``lora.merge_lora``);
* in each bounded layer, the query, key, value, lambda and write-gate projections as one product
  (``BoundedCoDAAttention.fuse_input_projections``);
* in each gated MLP of the Llama family, the gate and up projections as one product (``fuse_gated_mlp``).

The outputs are the same to float rounding (tested). The original modules stay, reading their rows of the fused
weights, so nothing is held twice; but the model can no longer be trained or saved as CoDA weights: fold a copy, or
load the weights again.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..attention import BoundedCoDAAttention
from ..fused_linear import fusable_linears, fuse_linears
from ..kernels.gated_activation import silu_and_mul
from .lora import INFERENCE_ONLY, merge_lora

# transformers' gated MLPs whose forward is down(act(gate(x)) * up(x)), all with .gate_proj, .up_proj, .down_proj and
# .act_fn
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
# transformers' and PyTorch's SiLU modules (ACT2FN["silu"]): F.silu
SILU_ACTIVATIONS = frozenset({"SiLUActivation", "SiLU"})


@dataclass(frozen=True)
class Folded:
    """What ``fold_for_inference`` merged: adapters, bounded layers' input projections, MLPs."""

    adapters: int
    attention: int
    mlps: int


def fuse_gated_mlp(mlp: nn.Module) -> bool:
    """``mlp.gate_proj`` and ``mlp.up_proj`` as one product ``mlp.gate_up_proj``, used by its forward; returns whether
    it fused (a Llama-family gated MLP of plain ``nn.Linear`` projections, not fused before)."""
    if type(mlp).__name__ not in GATED_MLPS or hasattr(mlp, "gate_up_proj"):
        return False
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not isinstance(gate, nn.Linear) or not isinstance(up, nn.Linear) or not fusable_linears([gate, up]):
        return False
    if gate.out_features != up.out_features:
        return False
    fused, (gate_rows, up_rows) = fuse_linears([gate, up])
    mlp.gate_up_proj = fused
    mlp.gate_proj, mlp.up_proj = gate_rows, up_rows
    mlp.forward = types.MethodType(_gated_mlp_forward, mlp)  # type: ignore[method-assign]
    return True


def silu_gated_mlp(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """``(gate_up_proj, down_proj)`` of a gated MLP that ``fuse_gated_mlp`` fused, with a SiLU activation and a plain
    ``nn.Linear`` down product (what ``kernels.step_products.activated_product`` computes), else None."""
    gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
    if type(getattr(mlp, "act_fn", None)).__name__ not in SILU_ACTIVATIONS:
        return None
    if type(gate_up) is not nn.Linear or type(down) is not nn.Linear:
        return None
    return gate_up, down


def _gated_mlp_forward(self: Any, x: Tensor) -> Tensor:
    """transformers' ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with the two products as one, and for SiLU the
    activation and the product as one pass (``kernels.gated_activation``)."""
    gate_up = self.gate_up_proj(x)
    if type(self.act_fn).__name__ in SILU_ACTIVATIONS:
        out: Tensor = self.down_proj(silu_and_mul(gate_up))
        return out
    gate, up = gate_up.split([self.gate_proj.out_features, self.up_proj.out_features], dim=-1)
    out = self.down_proj(self.act_fn(gate) * up)
    return out


def fold_for_inference(model: nn.Module) -> Folded:
    """Fold ``model`` in place for inference (module docstring); returns what it merged."""
    adapters = merge_lora(model)
    layers = [m for m in model.modules() if isinstance(m, BoundedCoDAAttention)]
    attention = sum(layer.fuse_input_projections() for layer in layers)
    mlps = sum(fuse_gated_mlp(module) for module in list(model.modules()))
    if attention or mlps:
        setattr(model, INFERENCE_ONLY, True)
    return Folded(adapters, attention, mlps)
