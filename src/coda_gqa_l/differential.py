"""The differential (CoDA) part of an attention layer: projections, the noise rotation, the
lambda gate, and the ``signal - lambda * noise`` combine.

Both the unbounded (``baseline.CoDAGQA``) and the bounded (``attention.BoundedCoDAAttention``)
layers own one ``DifferentialCore``, so they share parameter names and can load each other's
weights (invariant 1 of docs/semantics.md section 5 compares them).

Query-head stacking, used by every attention path: for KV head ``g`` with ``G = H / Hkv`` query
heads, the stacked queries are ``[signal heads of g, noise heads of g]``, shape
``(B, Hkv, 2G, L, Dh)``. Query head ``h`` belongs to KV head ``h // G`` (the usual GQA order).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.combine import differential_combine
from .kernels.dispatch import fused_combine
from .primitives import HeadwiseRMSNorm, RMSNorm, RopeLayout, RotaryEmbedding, apply_rope, expand_pairs

HeadNorm = Literal["rms", "identity"]


class DifferentialCore(nn.Module):
    """Projections and the differential combine of one attention layer.

    Args:
        embed_dim: model width ``D``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv`` (divides ``H``).
        head_dim: per-head size ``Dh``; defaults to ``D / H`` but models may differ (Qwen3).
        differential: ``False`` drops the noise stream (plain GQA with the same projections).
        head_norm: ``rms`` (per-head RMSNorm of the combined output) or ``identity`` (the
            choice for retrofitting a pretrained model).
        lambda_init_bias: bias of the lambda gate; ``sigmoid(-6) = 0.0025`` starts near 0.
        theta_init: initial noise rotation angle (radians) of every head and pair.
        exact_identity: multiply lambda by a learned scalar that starts at 0, so a freshly
            converted model computes its original function exactly.
        rope_base, rope_layout, rope_scaling, max_position_embeddings: RoPE settings, read
            from the model config when retrofitting.
        qkv_bias, o_bias: biases on the projections (Qwen2 has q/k/v biases).
        qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3), with ``qk_norm_eps``.
        softmax_scale: defaults to ``1 / sqrt(Dh)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        *,
        differential: bool = True,
        head_norm: HeadNorm = "rms",
        lambda_init_bias: float = -6.0,
        theta_init: float = 0.5,
        exact_identity: bool = False,
        rope_base: float = 10000.0,
        rope_layout: RopeLayout = "half",
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        softmax_scale: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads}); pass head_dim")
            head_dim = embed_dim // num_heads
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 (RoPE rotates pairs), got {head_dim}")
        if head_norm not in ("rms", "identity"):
            raise ValueError(f"head_norm must be 'rms' or 'identity', got {head_norm!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.differential = differential
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=o_bias)
        self.q_norm: nn.Module | None = RMSNorm(head_dim, qk_norm_eps) if qk_norm else None
        self.k_norm: nn.Module | None = RMSNorm(head_dim, qk_norm_eps) if qk_norm else None
        self.rope = RotaryEmbedding(head_dim, rope_base, rope_layout, rope_scaling, max_position_embeddings)
        self.theta: nn.Parameter | None = None
        self.lambda_proj: nn.Linear | None = None
        self.lambda_scale: nn.Parameter | None = None
        if differential:
            self.theta = nn.Parameter(torch.full((num_heads, head_dim // 2), float(theta_init)))
            self.lambda_proj = nn.Linear(embed_dim, num_heads)
            nn.init.zeros_(self.lambda_proj.weight)
            nn.init.constant_(self.lambda_proj.bias, float(lambda_init_bias))
            if exact_identity:
                self.lambda_scale = nn.Parameter(torch.zeros(()))
        self.head_norm: nn.Module = HeadwiseRMSNorm(num_heads, head_dim) if head_norm == "rms" else nn.Identity()

    @property
    def query_streams(self) -> int:
        """Stacked query heads per KV head: ``2G`` when differential, else ``G``."""
        return self.group * (2 if self.differential else 1)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``x (B, L, D)`` -> q ``(B, H, L, Dh)``, k and v ``(B, Hkv, L, Dh)`` (no RoPE yet),
        lambda ``(B, H, L)`` in float32 or None when not differential."""
        k, v = self.project_keys(x)
        q, lam = self.project_queries(x)
        return q, k, v, lam

    def project_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``project``'s keys and values alone (a caller can launch what reads them before the queries' products)."""
        return self.split_key_heads(self.k_proj(x), self.v_proj(x))

    def project_queries(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``project``'s queries and lambda alone."""
        lam = None if self.lambda_proj is None else torch.sigmoid(self.lambda_proj(x).float()).transpose(1, 2)
        return self.split_query_heads(self.q_proj(x), lam)

    def split_heads(
        self, q: Tensor, k: Tensor, v: Tensor, lam: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The projections' outputs ``(B, L, heads * Dh)`` and ``sigmoid(lambda logits) (B, H, L)`` -> ``project``'s
        result (heads split, the query and key norms, lambda's scale)."""
        k, v = self.split_key_heads(k, v)
        q, lam = self.split_query_heads(q, lam)
        return q, k, v, lam

    def split_key_heads(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``split_heads`` for the keys and values alone: ``(B, Hkv, L, Dh)`` each, the key norm applied."""
        b, length, _ = k.shape
        k = k.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return (k if self.k_norm is None else self.k_norm(k)), v

    def split_query_heads(self, q: Tensor, lam: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``split_heads`` for the queries and lambda alone: ``(B, H, L, Dh)``, the query norm and lambda's scale
        applied."""
        b, length, _ = q.shape
        q = q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if lam is not None and self.lambda_scale is not None:
            lam = lam * self.lambda_scale
        return q, lam

    def stack_queries(self, q_roped: Tensor) -> Tensor:
        """``(B, H, L, Dh)`` queries after RoPE -> stacked ``(B, Hkv, streams, L, Dh)``.

        The noise query is the signal query with each pair of head ``h`` rotated by
        ``theta[h]``; rotating after RoPE equals rotating before, since both turn the same pairs.
        """
        b, _, length, d = q_roped.shape
        signal = q_roped.view(b, self.num_kv_heads, self.group, length, d)
        if self.theta is None:
            return signal
        cos, sin = expand_pairs(self.theta.cos(), self.theta.sin(), self.rope.layout)
        noise = apply_rope(
            q_roped, cos[:, None, :].to(q_roped.dtype), sin[:, None, :].to(q_roped.dtype), self.rope.layout
        )
        return torch.cat([signal, noise.view(b, self.num_kv_heads, self.group, length, d)], dim=2)

    def noise_tables(self) -> tuple[Tensor, Tensor] | None:
        """The noise rotation's cos and sin ``(H, Dh)`` in float32 (None without noise heads), for inference paths
        that take no gradient through ``theta``. Kept between calls while ``theta`` is unchanged (same storage, same
        version): a chunk or decode step would otherwise rebuild them in every layer (five kernels each)."""
        theta = self.theta
        if theta is None:
            return None
        key = (id(theta), theta.data_ptr(), theta._version, theta.device, theta.dtype)
        kept = getattr(self, "_noise_tables", None)
        if kept is not None and kept[0] == key:
            return kept[1]
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: usable outside inference mode too
            angles = theta.detach().float()
            tables = expand_pairs(angles.cos(), angles.sin(), self.rope.layout)
        self._noise_tables = (key, tables)
        return tables

    def combine(self, attended: Tensor, lam: Tensor | None) -> Tensor:
        """Stacked attention outputs ``(B, Hkv, streams, L, Dh)`` -> ``(B, L, D)``.

        ``o = N(signal - lambda * noise)``, then ``W_o``.
        """
        b, _, _, length, d = attended.shape
        if lam is not None and fused_combine(attended.device, differential=True):
            # one pass forward and one backward instead of ~10 over float32 temporaries (kernels/combine.py)
            norm = self.head_norm if isinstance(self.head_norm, HeadwiseRMSNorm) else None
            weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
            return self.o_proj(differential_combine(attended, lam, weight, eps))
        signal = attended[:, :, : self.group].reshape(b, self.num_heads, length, d)
        if lam is not None:
            noise = attended[:, :, self.group :].reshape(b, self.num_heads, length, d)
            signal = (signal.float() - lam[..., None] * noise.float()).to(attended.dtype)
        out = self.head_norm(signal)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * d))

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError/TypeError naming what is wrong with ``x``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (batch, length, {self.embed_dim}), got {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x has width {x.shape[-1]}, the layer expects embed_dim={self.embed_dim}")
        if x.shape[1] == 0:
            raise ValueError("x has length 0")
        weight = self.q_proj.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"x has dtype {x.dtype}, the layer's weights are {weight.dtype}")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device}, the layer's weights are on {weight.device}")
        if not _FINITE_CHECKED_UPSTREAM.get() and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf values")


_FINITE_CHECKED_UPSTREAM = contextvars.ContextVar("coda_gqa_l_finite_checked_upstream", default=False)


@contextlib.contextmanager
def finite_checked_upstream() -> Iterator[None]:
    """Inside this block the layers do not read their input back to test it for NaN or Inf: the caller has. On a
    GPU each such read is a host synchronisation, so the model adapters test a forward's input once, at its first
    layer, rather than at every layer."""
    token = _FINITE_CHECKED_UPSTREAM.set(True)
    try:
        yield
    finally:
        _FINITE_CHECKED_UPSTREAM.reset(token)


def sdpa_stacked(q: Tensor, k: Tensor, v: Tensor, scale: float, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """Attention of stacked queries ``(B, Hkv, S, Lq, Dh)`` over ``(B, Hkv, Lk, Dh)`` through SDPA."""
    b, hkv, streams, lq, d = q.shape
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv * streams, lq, d), k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=True
    )
    return out.view(b, hkv, streams, lq, d)
