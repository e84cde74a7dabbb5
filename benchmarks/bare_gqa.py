"""The bare grouped-query attention layer the suite measures ``BaselineGQA`` against.

Nothing but what GQA needs: four bias-free projections, RoPE (half-split pairs, angles in
float32 from the positions) and one ``F.scaled_dot_product_attention(..., is_causal=True,
enable_gqa=True)``. If ``BaselineGQA`` is more than 10% slower than this, the baseline is not
fair and every ratio against it would be inflated; the suite prints and records that ratio.

``decode_fixed`` is a decode-speed reference, not a decoder: it writes the new key and value at
a fixed slot and attends over all ``C`` cached keys with no mask, so SDPA can take its fastest
(flash) kernel. It bounds what a static-cache GQA decoder could reach at context ``C``.
``fuse_qkv`` makes the three input projections one product, as an inference engine would (vLLM's fused QKV): the
decode reference for a bounded layer whose input projections are fused too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class BareGQA(nn.Module):
    """``x (B, L, D)`` -> ``(B, L, D)``: causal grouped-query attention with RoPE."""

    inv_freq: Tensor

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, rope_base: float = 1e4):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False)
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / rope_base**exponents, persistent=False)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = positions.float()[:, None] * self.inv_freq.float()
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def fuse_qkv(self) -> None:
        """The query, key and value projections as one product (one weight, rows q then k then v)."""
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()
        self.qkv_proj = nn.Linear(
            weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype
        )
        self.qkv_proj.weight.data.copy_(weight)
        del self.q_proj, self.k_proj, self.v_proj  # nothing held twice

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, length, _ = x.shape
        width_q, width_kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([width_q, width_kv, width_kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self._rope(positions, x.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _output(self, attended: Tensor) -> Tensor:
        b, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._project(x, torch.arange(x.shape[1], device=x.device))
        return self._output(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))

    def decode_fixed(self, x_t: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor) -> Tensor:
        """One token ``x_t (B, 1, D)`` over ``k_cache, v_cache (B, Hkv, C, Dh)``, all visible.

        The new key and value overwrite slot ``position`` (a 1-element int64 device tensor), as a
        decoder's write would; ``position`` does not advance. Graph-capturable.
        """
        q, k, v = self._project(x_t, position)
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v)
        return self._output(F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True))
