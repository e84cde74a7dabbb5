"""Which parameters train (docs/training.md): the CoDA parameters, plus LoRA, or everything.

CoDA parameters are the ones conversion adds on top of the base model: the noise rotation
``theta``, the lambda gate, the head norm, the bank write gate and the summary EMA rate. The
factorial's plain-GQA arm has none while unbounded (it trains LoRA only), and the write gate and
EMA rate once bounded.
"""

from __future__ import annotations

import re
from typing import Literal

from torch import nn

Trainable = Literal["coda", "coda+lora", "all"]
TRAINABLE_CHOICES: tuple[str, ...] = ("coda", "coda+lora", "all")

# the parameters conversion adds, by their names inside an adapter (``...self_attn.layer.<name>``)
# or a bare layer; anchored on ``layer.`` so that e.g. a Llama MLP's ``gate_proj`` never matches
_CODA_NAME = re.compile(
    r"(^|\.layer\.)(core\.theta|core\.lambda_proj\.(weight|bias)|core\.head_norm\.weight"
    r"|gate_proj\.(weight|bias)|summary_rate_logit)$"
)


def is_coda_parameter(name: str) -> bool:
    return _CODA_NAME.search(name) is not None


def is_lora_parameter(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))


def select_trainable(model: nn.Module, what: str) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on the chosen parameters (and off on the rest); returns them by name."""
    if what not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {what!r}")
    chosen: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        keep = what == "all" or is_coda_parameter(name) or (what == "coda+lora" and is_lora_parameter(name))
        param.requires_grad_(keep)
        if keep:
            chosen[name] = param
    converted = getattr(getattr(model, "config", None), "coda_gqa_l", None) is not None
    if not converted and not any(is_coda_parameter(n) for n in chosen):
        raise ValueError("the model has no CoDA parameters: convert it with coda_gqa_l.convert first")
    if what == "coda+lora" and not any(is_lora_parameter(n) for n in chosen):
        raise ValueError("trainable='coda+lora' but the model has no LoRA adapters: call add_lora first")
    if not chosen:
        # e.g. the factorial's unbounded plain-GQA arm with trainable='coda': it has no CoDA parameters
        raise ValueError(f"trainable={what!r} selects no parameter of this model")
    return chosen


def saved_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a CoDA weights file holds: the CoDA and LoRA parameters (never the frozen base)."""
    return {n: p for n, p in model.named_parameters() if is_coda_parameter(n) or is_lora_parameter(n)}
