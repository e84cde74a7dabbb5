"""``convert(model, config)``: replace every attention module of a Hugging Face model.

Each decoder layer's ``self_attn`` becomes a ``CoDAAttentionAdapter`` holding our layer with
the original q/k/v/o weights (and q/k norms). With the defaults (``head_norm="identity"``,
lambda near 0) the converted model computes the original function up to lambda's 0.25%; with
``exact_identity=True`` exactly (lambda is scaled by a learned scalar that starts at 0).

The model's attention implementation is set to ``"coda"``, which we register with
transformers: its mask function hands the adapters the 2D padding mask (or nothing), so
transformers never builds an L x L mask, whatever the length.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..attention import BoundedCoDAAttention
from ..baseline import CoDAGQA, _UnboundedAttention
from ..config import BoundedConfig, check_routing_names
from .adapters import CONVERSION_SEED, CoDAAttentionAdapter, build_adapter, spec_from_config

ATTN_IMPLEMENTATION = "coda"


def _padding_only_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask function for the 'coda' implementation: the 2D padding mask, never an L x L one."""
    return attention_mask


def _unconverted_attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    raise TypeError(
        f"{type(module).__name__} was not converted but the model uses the 'coda' attention implementation; "
        "convert every attention layer with coda_gqa_l.convert"
    )


def register_attention() -> None:
    """Register the 'coda' attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _unconverted_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_only_mask)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM (``model.model.layers``) or a base model (``model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers or .layers")
    return list(layers)


def convert(
    model: nn.Module,
    config: BoundedConfig | str | None = "medium",
    *,
    differential: bool = True,
    head_norm: str = "identity",
    exact_identity: bool = False,
    lambda_init_bias: float = -6.0,
    theta_init: float = 0.5,
    progress: bool = False,
) -> nn.Module:
    """Convert ``model`` in place and return it.

    Args:
        config: a ``BoundedConfig``, a preset name (``tiny``/``medium``/``large``), or ``None``
            for unbounded attention with a full cache.
        differential: ``False`` keeps plain GQA attention (the factorial's control), unbounded
            or bounded (for a bounded config it is the same as ``BoundedConfig(differential=False)``).
        head_norm, exact_identity, lambda_init_bias, theta_init: see ``DifferentialCore``.
    """
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise ValueError(f"{type(model).__name__} has no .config: is it a Hugging Face model?")
    spec = spec_from_config(model_config)
    bounded = BoundedConfig.preset(config) if isinstance(config, str) else config
    if bounded is not None and not differential:
        bounded = dataclasses.replace(bounded, differential=False)
    layers = decoder_layers(model)
    iterator: Any = layers
    if progress:
        from tqdm import tqdm

        iterator = tqdm(layers, desc="converting attention", unit="layer")
    for idx, decoder_layer in enumerate(iterator):
        attn = getattr(decoder_layer, "self_attn", None)
        if attn is None:
            raise ValueError(f"decoder layer {idx} has no self_attn")
        if isinstance(attn, CoDAAttentionAdapter):
            raise ValueError(f"decoder layer {idx} is already converted")
        decoder_layer.self_attn = build_adapter(
            attn,
            spec,
            idx,
            bounded,
            differential=differential,
            head_norm=head_norm,
            exact_identity=exact_identity,
            lambda_init_bias=lambda_init_bias,
            theta_init=theta_init,
        )
    register_attention()
    model_config._attn_implementation = ATTN_IMPLEMENTATION
    if bounded is not None:
        # A plain forward then runs each sequence from an empty state; generation must pass a
        # BoundedCache (a DynamicCache cannot hold bounded states, and the adapters say so).
        model_config.use_cache = False
    model_config.coda_gqa_l = {
        "bounded": bounded.to_dict() if bounded is not None else None,
        "differential": bounded.differential if bounded is not None else differential,
        "head_norm": head_norm,
        "exact_identity": exact_identity,
    }
    return model


def to_bounded(model: nn.Module, config: BoundedConfig | str = "medium") -> nn.Module:
    """Switch a model converted to unbounded attention to the bounded state, in place (phase 2).

    Each layer keeps its trained core (projections, LoRA adapters, theta, lambda, head norm);
    the bank's write gate and EMA rate are new, drawn from a generator seeded by the layer
    index, so a switch is reproducible. A differential core (``CoDAGQA``) becomes bounded CoDA;
    a plain one (``BaselineGQA``, the factorial's control) becomes bounded plain GQA with the
    same banks: ``config.differential`` follows the core.
    """
    bounded = BoundedConfig.preset(config) if isinstance(config, str) else config
    adapters = [m for m in model.modules() if isinstance(m, CoDAAttentionAdapter)]
    if not adapters:
        raise ValueError("the model has no converted attention: call coda_gqa_l.convert(model, None) first")
    kinds = {isinstance(a.layer, CoDAGQA) for a in adapters if isinstance(a.layer, _UnboundedAttention)}
    if len(kinds) > 1:
        raise ValueError("the model mixes differential and plain layers: to_bounded switches one kind")
    for adapter in adapters:
        old = adapter.layer
        if not isinstance(old, _UnboundedAttention):
            raise ValueError(
                f"layer {adapter.layer_idx} is {type(old).__name__}, not unbounded attention: to_bounded switches a "
                "model converted with convert(model, None)"
            )
        core = old.core
        bounded = dataclasses.replace(bounded, differential=core.differential)
        weight = core.q_proj.weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CONVERSION_SEED + adapter.layer_idx)
            layer = BoundedCoDAAttention(
                core.embed_dim, core.num_heads, core.num_kv_heads, head_dim=core.head_dim, config=bounded
            )
        layer.core = core
        layer.to(device=weight.device, dtype=weight.dtype)
        adapter.layer = layer
    model_config: Any = model.config
    model_config.use_cache = False
    settings = dict(getattr(model_config, "coda_gqa_l", {}) or {})
    settings.update(bounded=bounded.to_dict(), differential=bounded.differential)
    model_config.coda_gqa_l = settings
    return model


def retune_routing(model: nn.Module, **thresholds: Any) -> nn.Module:
    """Set bank-routing thresholds (``ROUTING_THRESHOLDS``) in every bounded layer, in place.

    States made before the change are refused by the layers afterwards (their config differs),
    and the model's ``config.coda_gqa_l`` records the new values, so a state or weights file saved
    from it says how it was routed.
    """
    check_routing_names(thresholds)
    layers = [a.layer for a in model.modules() if isinstance(a, CoDAAttentionAdapter)]
    bounded = [layer for layer in layers if isinstance(layer, BoundedCoDAAttention)]
    if not bounded:
        raise ValueError("the model has no bounded CoDA layers: nothing to retune")
    for layer in bounded:
        layer.config = dataclasses.replace(layer.config, **thresholds)  # validates
    model_config: Any = model.config
    settings = dict(getattr(model_config, "coda_gqa_l", {}) or {})
    settings["bounded"] = bounded[0].config.to_dict()
    model_config.coda_gqa_l = settings
    return model
