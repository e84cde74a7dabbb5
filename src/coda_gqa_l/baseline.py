"""Unbounded attention layers: ``BaselineGQA`` (plain grouped-query attention, the control) and
``CoDAGQA`` (differential attention with a full KV cache).

Both run through PyTorch's SDPA (flash on GPU) with RoPE at true positions. The KV cache keeps
keys after RoPE and grows with every token; it is the "full cache" the bounded state replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .differential import DifferentialCore, HeadNorm, sdpa_stacked
from .primitives import RopeLayout, apply_rope


@dataclass
class KVCache:
    """A growing cache: keys (after RoPE) and values ``(B, Hkv, T, Dh)``; ``pos == T``."""

    k: Tensor
    v: Tensor

    @property
    def pos(self) -> int:
        return int(self.k.shape[2])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class _UnboundedAttention(nn.Module):
    differential: bool

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        rope_layout: RopeLayout = "half",
        rope_scaling: dict[str, Any] | None = None,
        head_norm: HeadNorm | None = None,
        **core_kwargs: Any,
    ) -> None:
        super().__init__()
        if head_norm is None:
            head_norm = "rms" if self.differential else "identity"
        self.core = DifferentialCore(
            embed_dim,
            num_heads,
            num_kv_heads,
            head_dim,
            differential=self.differential,
            head_norm=head_norm,
            rope_base=rope_base,
            rope_layout=rope_layout,
            rope_scaling=rope_scaling,
            **core_kwargs,
        )

    def init_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        weight = self.core.q_proj.weight
        shape = (batch_size, self.core.num_kv_heads, 0, self.core.head_dim)
        empty = torch.empty(shape, device=device or weight.device, dtype=dtype or weight.dtype)
        return KVCache(empty, empty.clone())

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """``x (B, L, D)`` -> ``(B, L, D)``, causal. With a cache, ``x`` continues it and the
        cache is extended in place (``cache.k``/``cache.v`` are rebound)."""
        self.core.check_input(x)
        if cache is None:
            return self.attend(x, 0)
        if cache.k.shape[0] != x.shape[0]:
            raise ValueError(f"cache batch size {cache.k.shape[0]} does not match x batch size {x.shape[0]}")

        def append(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            cache.k, cache.v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            return cache.k, cache.v

        return self.attend(x, cache.pos, append)

    def attend(
        self,
        x: Tensor,
        start: int,
        append: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        """Attention for tokens ``start .. start + L - 1`` of ``x (B, L, D)``.

        ``append(k, v)`` stores the new keys (after RoPE) and values in a cache and returns all
        of them; without it the chunk attends to itself only. ``key_padding (B, T)`` (True =
        real token) masks padded keys for batches of different lengths.
        """
        core = self.core
        q, k, v, lam = core.project(x)
        length = x.shape[1]
        positions = torch.arange(start, start + length, device=x.device)
        cos, sin = core.rope.cos_sin(positions, q.dtype)
        q = apply_rope(q, cos, sin, core.rope.layout)
        k = apply_rope(k, cos, sin, core.rope.layout)
        if append is not None:
            k, v = append(k, v)
        total = k.shape[2]
        mask = None
        if key_padding is not None or (total > length and length > 1):
            # bottom-right causal alignment: query i (at total - length + i) sees keys 0..total - length + i
            key_pos = torch.arange(total, device=x.device)
            mask = key_pos[None, :] <= (key_pos[total - length :])[:, None]
            if key_padding is not None:
                # a padded query row would see no key at all (NaN); let every query see itself
                own = key_pos[None, :] == (key_pos[total - length :])[:, None]
                mask = (mask[None, None] & key_padding[:, None, None, -total:].bool()) | own
        causal = mask is None and length > 1
        attended = sdpa_stacked(core.stack_queries(q), k, v, core.softmax_scale, mask, is_causal=causal)
        return core.combine(attended, lam)


class BaselineGQA(_UnboundedAttention):
    """Plain grouped-query attention with RoPE and a full KV cache: the control."""

    differential = False


class CoDAGQA(_UnboundedAttention):
    """Unbounded differential attention (SPEC 2.1) with a full KV cache."""

    differential = True
