"""Per-layer adapters: our attention behind a Hugging Face attention module's call signature.

``CoDAAttentionAdapter`` replaces a decoder layer's ``self_attn``. It takes the same call as
the module it replaces (``hidden_states``, ``attention_mask``, ``cache``, ...) and returns
``(output, None)``; the cache is read under whichever name the installed transformers uses
(``hf_compat``). RoPE is computed by our layer from the model config (base,
scaling and layout read once at conversion), so the model's own rotary tables are ignored.

All inference state lives in the cache object passed with each call, never on the module,
so concurrent requests with different caches cannot collide:

* bounded layers keep a ``BoundedState`` per layer in a ``BoundedCache``;
* unbounded layers append to any ``transformers`` cache through its ``update`` method.

The family adapters (``LlamaCoDAAdapter``, ``Qwen3CoDAAdapter``, ``GenericCoDAAdapter``, alias
``EveCoDAAdapter``) differ only in how they read a module's projections; they all build the same adapter.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from ..attention import BoundedCoDAAttention
from ..baseline import BaselineGQA, CoDAGQA, _UnboundedAttention
from ..config import BoundedConfig
from ..differential import finite_checked_upstream
from ..primitives import RopeLayout
from .cache import BoundedCache
from .hf_compat import CACHE_ARGUMENTS, pop_cache

CONVERSION_SEED = 20261123
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes and position settings of a model's attention, read from its config."""

    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int | None
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    qk_norm_eps: float
    rope_layout: RopeLayout = "half"  # Hugging Face's layout for every supported family

    def layer_kwargs(self) -> dict[str, Any]:
        return dict(
            head_dim=self.head_dim,
            rope_base=self.rope_base,
            rope_layout=self.rope_layout,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            qk_norm=self.qk_norm,
            qk_norm_eps=self.qk_norm_eps,
        )


def spec_from_config(config: Any) -> AttentionSpec:
    """Read an ``AttentionSpec`` from a Hugging Face config, refusing what we cannot run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "GenericCoDAAdapter converts a single module with q/k/v/o projections"
        )
    _refuse_unsupported_attention(config)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy and not rope.get("rope_type"):
        rope.update(legacy)
    base = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if base is None:
        raise ValueError("the model config has no RoPE base (rope_parameters['rope_theta'] or rope_theta)")
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    bias = bool(getattr(config, "attention_bias", False))
    qwen3 = model_type in ("qwen3", "qwen3_moe")
    return AttentionSpec(
        embed_dim=int(config.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        rope_base=float(base),
        rope_scaling=scaling,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        qkv_bias=True if model_type == "qwen2" else bias,
        o_bias=False if model_type == "qwen2" else bias,
        qk_norm=qwen3,
        qk_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
    )


def _refuse_unsupported_attention(config: Any) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = getattr(config, "use_sliding_window", True)
    if any(t != "full_attention" for t in layer_types) or (sliding is not None and uses_sliding):
        raise ValueError(
            f"sliding-window or local/global attention (sliding_window={sliding}, layer_types="
            f"{sorted(set(layer_types))}) is not supported: the bounded state already limits what each token sees"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit softcapping is not supported")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "rope") == "alibi":
        raise ValueError("ALiBi position biases are not supported (CoDA-GQA-L needs RoPE)")
    if getattr(config, "kv_lora_rank", None):
        raise ValueError("multi-head latent attention (MLA) is not supported")


def _copy_weights(attn: nn.Module, layer: nn.Module) -> None:
    """Copy q/k/v/o (and q/k norms) from a Hugging Face attention module into our layer."""
    core = layer.core  # type: ignore[union-attr]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            src, dst = getattr(attn, name), getattr(core, name)
            if src.weight.shape != dst.weight.shape:
                raise ValueError(f"{name} has shape {tuple(src.weight.shape)}, expected {tuple(dst.weight.shape)}")
            dst.weight.copy_(src.weight)
            if (src.bias is None) != (dst.bias is None):
                raise ValueError(f"{name}: bias presence differs between the model and its config")
            if src.bias is not None:
                dst.bias.copy_(src.bias)
        for name in ("q_norm", "k_norm"):
            if getattr(core, name) is not None:
                getattr(core, name).weight.copy_(getattr(attn, name).weight)


class CoDAAttentionAdapter(nn.Module):
    """Stands in for a Hugging Face attention module; wraps one of our layers."""

    def __init__(self, layer: BoundedCoDAAttention | _UnboundedAttention, layer_idx: int) -> None:
        super().__init__()
        self.layer = layer
        self.layer_idx = layer_idx
        self.is_causal = True

    @property
    def bounded(self) -> bool:
        return isinstance(self.layer, BoundedCoDAAttention)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Any = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        cache = pop_cache(kwargs)
        _refuse_unread_cache(kwargs, cache)
        padding = _key_padding(attention_mask, hidden_states, first_layer=self.layer_idx == 0)
        # on a GPU the first layer tested the input (above): the layers skip their own read-back
        checked = finite_checked_upstream() if hidden_states.device.type != "cpu" else contextlib.nullcontext()
        with checked:
            if isinstance(self.layer, BoundedCoDAAttention):
                return self._bounded(hidden_states, padding, cache), None
            layer: _UnboundedAttention = self.layer
            if cache is None:
                return layer.attend(hidden_states, 0, None, padding), None
            start = cache.get_seq_length(self.layer_idx)

            def append(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
                return cache.update(k, v, self.layer_idx)

            return layer.attend(hidden_states, start, append, padding), None

    def _bounded(self, x: Tensor, padding: Tensor | None, cache: Any) -> Tensor:
        layer = self.layer
        assert isinstance(layer, BoundedCoDAAttention)
        if padding is not None:
            raise ValueError(
                "bounded CoDA layers do not take padded batches (rows of different lengths) yet: padding would be "
                "written into the state; run rows of different lengths as separate batches"
            )
        if cache is None:
            return layer(x)  # type: ignore[return-value]
        if not isinstance(cache, BoundedCache):
            raise TypeError(
                f"bounded CoDA layers keep their state in a BoundedCache, got {type(cache).__name__}; "
                "pass cache=BoundedCache(model) (past_key_values= before transformers 5.24), to generate() too"
            )
        state = cache.state_for(self.layer_idx, layer, x.shape[0])
        if torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters()):
            y, new_state = layer(x, state, return_state=True)  # type: ignore[misc]
            cache.set_state(self.layer_idx, new_state)
            return y
        y, _ = layer.prefill_chunked(x, state, block_size=cache.block_size)
        return y


def _refuse_unread_cache(kwargs: dict[str, Any], cache: Any) -> None:
    """Fail loudly when transformers hands us a cache we would not read.

    A future release may rename the cache argument again; a bounded layer that missed its
    cache would run each call from an empty state and generate garbage without an error.
    """
    unread = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if unread:
        raise TypeError(
            f"the attention layer was given a cache under {unread[0]!r}, a name this version of coda_gqa_l does not "
            f"know (it reads {', '.join(CACHE_ARGUMENTS)}): upgrade coda-gqa-l or install a supported transformers"
        )
    if cache is None and kwargs.get("use_cache"):
        raise TypeError(
            "use_cache=True but the attention layer received no cache: this transformers release passes it in a way "
            "coda_gqa_l does not recognise; upgrade coda-gqa-l or install a supported transformers"
        )


def _key_padding(attention_mask: Tensor | None, x: Tensor, first_layer: bool) -> Tensor | None:
    """The 2D padding mask (True = real token), or None when every token is real; raises for a model input with
    NaN or Inf when ``x`` is on a GPU (the layers then skip their own test, see ``_ForwardChecks``)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"expected a 2D padding mask, got shape {tuple(attention_mask.shape)}; was the model converted with "
            "coda_gqa_l.convert (which registers the 'coda' attention implementation)?"
        )
    padded = _forward_checks.read(attention_mask, x, first_layer)
    return attention_mask.bool() if attention_mask is not None and padded else None


class _ForwardChecks(threading.local):
    """What the adapters read back from the device once per forward instead of once per layer (on a GPU each read
    is a host synchronisation, which stalls the queue of launches): whether the padding mask has padding, and on a
    GPU whether the first layer's input is finite (the layers below it do not test theirs: NaN or Inf there would
    come from the model's own arithmetic, not from its input). Every layer of a forward gets the same mask tensor;
    the first layer reads both in one go, later layers reuse the mask's answer while the mask is the same tensor
    (held weakly) and, where it keeps one, at the same version. Per thread: concurrent forwards do not mix."""

    def __init__(self) -> None:
        self.mask: weakref.ref[Tensor] | None = None
        self.version: int | None = None
        self.has_padding = False

    def read(self, mask: Tensor | None, x: Tensor, first_layer: bool) -> bool:
        test_input = first_layer and x.device.type != "cpu"  # on the CPU every layer tests its input at no cost
        version = None if mask is None or mask.is_inference() else mask._version
        known = mask is not None and self.mask is not None and self.mask() is mask and self.version == version
        if mask is not None and (first_layer or not known):
            flags = [mask.bool().all()] + ([torch.isfinite(x).all()] if test_input else [])
            # one read for both, unless the mask sits on another device than the hidden states
            values = _read_back(torch.stack(flags)) if len({f.device for f in flags}) == 1 else [bool(f) for f in flags]
            self.has_padding = not values[0]
            self.mask, self.version = weakref.ref(mask), version
            if test_input and not values[1]:
                raise ValueError("the model's hidden states entering its first attention layer contain NaN or Inf")
        elif test_input and not _read_back(torch.isfinite(x).all().view(1))[0]:
            raise ValueError("the model's hidden states entering its first attention layer contain NaN or Inf")
        return self.has_padding if mask is not None else False


def _read_back(flags: Tensor) -> list[bool]:
    return [bool(v) for v in flags.tolist()]  # the device-to-host read


_forward_checks = _ForwardChecks()


def build_adapter(
    attn: nn.Module,
    spec: AttentionSpec,
    layer_idx: int,
    config: BoundedConfig | None,
    *,
    differential: bool = True,
    head_norm: str = "identity",
    exact_identity: bool = False,
    lambda_init_bias: float = -6.0,
    theta_init: float = 0.5,
) -> CoDAAttentionAdapter:
    """Our layer with ``attn``'s weights: bounded when ``config`` is given, else unbounded."""
    kwargs: dict[str, Any] = spec.layer_kwargs()
    weight: Tensor = attn.q_proj.weight  # type: ignore[union-attr,assignment]
    core_kwargs: dict[str, Any] = dict(
        head_norm=head_norm, exact_identity=exact_identity, lambda_init_bias=lambda_init_bias, theta_init=theta_init
    )
    layer: BoundedCoDAAttention | _UnboundedAttention
    # Conversion is reproducible: the new parameters (write gate) draw from a generator
    # seeded by the layer index, so two conversions of one model have one fingerprint.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CONVERSION_SEED + layer_idx)
        layer = _new_layer(spec, config, differential, kwargs, core_kwargs)
    layer.to(device=weight.device, dtype=weight.dtype)
    _copy_weights(attn, layer)
    return CoDAAttentionAdapter(layer, layer_idx)


def _new_layer(
    spec: AttentionSpec,
    config: BoundedConfig | None,
    differential: bool,
    kwargs: dict[str, Any],
    core_kwargs: dict[str, Any],
) -> BoundedCoDAAttention | _UnboundedAttention:
    layer: BoundedCoDAAttention | _UnboundedAttention
    if config is not None:
        layer = BoundedCoDAAttention(
            spec.embed_dim, spec.num_heads, spec.num_kv_heads, config=config, **kwargs, **core_kwargs
        )
    elif differential:
        layer = CoDAGQA(spec.embed_dim, spec.num_heads, spec.num_kv_heads, **kwargs, **core_kwargs)
    else:
        layer = BaselineGQA(spec.embed_dim, spec.num_heads, spec.num_kv_heads, **kwargs, head_norm="identity")
    return layer


class LlamaCoDAAdapter:
    """Llama-family attention (Llama 2/3, Mistral, Mixtral, SmolLM, Qwen2) -> ``CoDAAttentionAdapter``."""

    @staticmethod
    def from_llama_attention(
        attn: nn.Module,
        bounded: bool | BoundedConfig = True,
        *,
        model_config: Any = None,
        layer_idx: int | None = None,
        **kwargs: Any,
    ) -> CoDAAttentionAdapter:
        model_config = model_config if model_config is not None else getattr(attn, "config", None)
        if model_config is None:
            raise ValueError("the attention module has no .config; pass model_config=")
        config = _bounded_config(bounded)
        idx = layer_idx if layer_idx is not None else int(getattr(attn, "layer_idx", 0))
        return build_adapter(attn, spec_from_config(model_config), idx, config, **kwargs)


class Qwen3CoDAAdapter(LlamaCoDAAdapter):
    """Qwen3 and Qwen3-MoE attention: explicit ``head_dim`` and q/k norms are read from the config."""

    from_qwen3_attention = LlamaCoDAAdapter.from_llama_attention


class GenericCoDAAdapter:
    """Any attention module with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and a RoPE config you state."""

    @staticmethod
    def from_attention(
        attn: nn.Module,
        *,
        num_heads: int,
        num_kv_heads: int,
        rope_base: float,
        head_dim: int | None = None,
        rope_scaling: dict[str, Any] | None = None,
        qk_norm: bool = False,
        rope_layout: RopeLayout = "half",
        bounded: bool | BoundedConfig = True,
        layer_idx: int = 0,
        **kwargs: Any,
    ) -> CoDAAttentionAdapter:
        """``rope_layout``: ``"half"`` rotates dimension pairs ``(i, i + Dh/2)`` (Hugging Face's
        models), ``"interleaved"`` pairs ``(2i, 2i+1)`` (GPT-J, the original RoPE code)."""
        embed_dim = attn.q_proj.weight.shape[1]  # type: ignore[union-attr,index]
        spec = AttentionSpec(
            embed_dim=int(embed_dim),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim or int(embed_dim) // num_heads,
            rope_base=rope_base,
            rope_scaling=rope_scaling,
            max_position_embeddings=None,
            qkv_bias=attn.q_proj.bias is not None,  # type: ignore[union-attr]
            o_bias=attn.o_proj.bias is not None,  # type: ignore[union-attr]
            qk_norm=qk_norm,
            qk_norm_eps=float(getattr(getattr(attn, "q_norm", None), "variance_epsilon", 1e-6)),
            rope_layout=rope_layout,
        )
        return build_adapter(attn, spec, layer_idx, _bounded_config(bounded), **kwargs)


EveCoDAAdapter = GenericCoDAAdapter  # the name docs/api.md and the public package use


def _bounded_config(bounded: bool | BoundedConfig | str) -> BoundedConfig | None:
    if isinstance(bounded, BoundedConfig):
        return bounded
    if isinstance(bounded, str):
        return BoundedConfig.preset(bounded)
    return BoundedConfig.preset("medium") if bounded else None
