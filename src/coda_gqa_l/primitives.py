"""Primitives shared by every attention module: RoPE (both pair layouts, scaled), RMS norms,
and ``repeat_kv``.

RoPE pairs dimensions either as ``(2i, 2i+1)`` ("interleaved", the original paper and
Meta's reference code) or as ``(i, i + Dh/2)`` ("half", the Hugging Face layout). The
differential noise rotation (``differential.py``) rotates the same pairs, so it commutes with
RoPE; getting the layout right per model is what keeps that true.

Angles are computed in float64 from integer positions and only then cast, so that large
positions (absolute mode, unbounded caches) keep their precision.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

RopeLayout = Literal["half", "interleaved"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _scaled_inv_freq(
    head_dim: int, base: float, scaling: dict[str, Any] | None, max_position_embeddings: int | None
) -> tuple[Tensor, float]:
    """Inverse frequencies (float64, ``head_dim / 2``) and the cos/sin multiplier."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if not scaling:
        return inv_freq, 1.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); dynamic NTK and LongRoPE change the "
            "frequencies with the sequence length, which a fixed-size state cannot follow"
        )
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, factor, scaling), 1.0
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if original is None:
        raise ValueError("YaRN scaling needs original_max_position_embeddings")
    return _yarn_inv_freq(head_dim, base, factor, int(original), scaling)


def _llama3_inv_freq(inv_freq: Tensor, factor: float, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1: divide low frequencies by ``factor``, keep high ones, blend in between."""
    low_factor = float(scaling["low_freq_factor"])
    high_factor = float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = context / low_factor, context / high_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    blend = (context / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - blend) * scaled / factor + blend * scaled
    in_between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_between, smoothed, scaled)


def _yarn_inv_freq(
    head_dim: int, base: float, factor: float, original: int, scaling: dict[str, Any]
) -> tuple[Tensor, float]:
    """YaRN (used by Qwen2.5/Qwen3 long-context configs): interpolate the low frequencies,
    extrapolate the high ones, ramp between, and scale the logits through cos/sin."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32.0
    beta_slow = scaling.get("beta_slow") or 1.0

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_freq = (1 / (factor * freqs)) * (1 - extrapolate) + (1 / freqs) * extrapolate
    return inv_freq, float(attention_factor)


def expand_pairs(angles_cos: Tensor, angles_sin: Tensor, layout: RopeLayout) -> tuple[Tensor, Tensor]:
    """Expand per-pair cos/sin (``..., Dh/2``) to per-dimension (``..., Dh``) for a layout."""
    if layout == "half":
        return torch.cat([angles_cos, angles_cos], -1), torch.cat([angles_sin, angles_sin], -1)
    if layout == "interleaved":
        return angles_cos.repeat_interleave(2, -1), angles_sin.repeat_interleave(2, -1)
    raise ValueError(f"rope layout must be 'half' or 'interleaved', got {layout!r}")


def _rotate_quarter(x: Tensor, layout: RopeLayout) -> Tensor:
    """The 90-degree rotation of every pair: ``(a, b) -> (-b, a)``."""
    if layout == "half":
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, layout: RopeLayout = "half") -> Tensor:
    """Rotate every pair of the last dimension of ``x`` by the angles whose cos/sin are given.

    ``cos`` and ``sin`` have the last dimension ``Dh`` (see ``expand_pairs``) and broadcast
    against ``x``. Used both for RoPE and for the per-head noise rotation.
    """
    return x * cos + _rotate_quarter(x, layout) * sin


class RotaryEmbedding(nn.Module):
    """RoPE tables for any base, layout and the scaling types Llama 3 and Qwen use.

    Args:
        head_dim: per-head size ``Dh`` (even).
        base: RoPE base (``rope_theta``); read it from the model config, never assume 10000.
        layout: ``half`` (Hugging Face) or ``interleaved``.
        scaling: a ``rope_parameters``/``rope_scaling`` dict (``default``, ``linear``,
            ``llama3``, ``yarn``); other types raise ValueError.
        max_position_embeddings: the model's trained context (YaRN's fallback).
    """

    inv_freq: Tensor

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        layout: RopeLayout = "half",
        scaling: dict[str, Any] | None = None,
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if layout not in ("half", "interleaved"):
            raise ValueError(f"rope layout must be 'half' or 'interleaved', got {layout!r}")
        if base <= 1.0:
            raise ValueError(f"rope base must be > 1, got {base}")
        self.head_dim, self.base, self.layout = head_dim, float(base), layout
        inv_freq, self.attention_scaling = _scaled_inv_freq(head_dim, float(base), scaling, max_position_embeddings)
        # what fixes the tables: rotary embeddings of equal signature give equal angles (step_tables.py)
        self.signature = (head_dim, float(base), layout, repr(sorted((scaling or {}).items())), max_position_embeddings)
        # float64 so that angles stay exact for large positions; a non-persistent buffer so it
        # follows .to(device) but never enters a checkpoint.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """cos and sin for integer ``positions`` (any shape): shape ``positions.shape + (Dh,)``."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float64 and inv_freq.device.type != "mps":
            inv_freq = inv_freq.double()  # a module-wide .to(float32) must not cost precision
        angles = positions.to(inv_freq.dtype).unsqueeze(-1) * inv_freq
        cos, sin = expand_pairs(angles.cos(), angles.sin(), self.layout)
        scale = self.attention_scaling
        return (cos * scale).to(dtype), (sin * scale).to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, layout={self.layout}"


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = _at_least_float32(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class HeadwiseRMSNorm(nn.Module):
    """RMSNorm of each head's output vector, with its own gain per head.

    Input ``(B, H, L, Dh)``; the gain has shape ``(H, Dh)`` and starts at ones.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.weight.shape[0] or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"HeadwiseRMSNorm expects (B, {self.weight.shape[0]}, L, {self.weight.shape[1]}), got {tuple(x.shape)}"
            )
        x32 = _at_least_float32(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight[:, None, :] * normed).to(x.dtype)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``(B, Hkv, L, Dh) -> (B, Hkv * n_rep, L, Dh)``: query head ``h`` reads KV head ``h // n_rep``."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)
