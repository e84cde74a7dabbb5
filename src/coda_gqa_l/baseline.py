"""Unbounded attention layers: ``BaselineGQA`` (plain grouped-query attention, the control) and
``CoDAGQA`` (differential attention with a full KV cache).

Both run through PyTorch's SDPA (flash on GPU) with RoPE at true positions. The KV cache keeps
keys after RoPE; it is the "full cache" the bounded state replaces. Two kinds:

- ``KVCache`` grows with every token (``torch.cat``): simple, but every step reallocates.
- ``StaticKVCache`` is preallocated to ``max_len`` tokens and keeps its fill level as a device
  tensor, so ``step_static`` never reads anything back to the host and can be captured in a
  CUDA graph: the fair decode baseline of the benchmarks (gpt-fast's static cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .differential import DifferentialCore, HeadNorm, sdpa_stacked
from .kernels.diff_attention import KEYS_FROM_ZERO, fused_attention
from .kernels.dispatch import static_cache_kernel, unbounded_attention
from .kernels.rope import rotate_and_stack
from .primitives import HeadwiseRMSNorm, RopeLayout, apply_rope


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


@dataclass
class StaticKVCache:
    """A preallocated cache for decoding under a CUDA graph.

    ``k``, ``v``: ``(B, Hkv, max_len, Dh)``, keys after RoPE; slots ``0 .. position - 1`` hold
    tokens, the rest is unused (never attended: masked out, or past the token's tile in the split decode kernel).
    ``position``: 0-d int64 tensor on the cache's device, the number of tokens written.
    ``slots``: ``arange(max_len)`` on the device; ``slots <= position`` is the attention mask,
    built on the device so that no step reads the position back to the host.
    """

    k: Tensor
    v: Tensor
    position: Tensor
    slots: Tensor

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])

    @property
    def pos(self) -> int:
        """Tokens written so far (reads the device position: a host synchronisation)."""
        return int(self.position.item())

    def nbytes(self) -> int:
        """Bytes of keys and values, for all ``max_len`` slots."""
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

    def init_static_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> StaticKVCache:
        """An empty ``StaticKVCache`` of ``max_len`` slots (defaults: the layer's device and dtype).

        The slots are filled with zeros, never read before they are written.
        """
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        weight = self.core.q_proj.weight
        device = device or weight.device
        shape = (batch_size, self.core.num_kv_heads, max_len, self.core.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype or weight.dtype)
        position = torch.zeros((), device=device, dtype=torch.int64)
        return StaticKVCache(k, torch.zeros_like(k), position, torch.arange(max_len, device=device))

    def forward(self, x: Tensor, cache: KVCache | StaticKVCache | None = None) -> Tensor:
        """``x (B, L, D)`` -> ``(B, L, D)``, causal. With a cache, ``x`` continues it and the
        cache is extended in place (a ``KVCache``'s ``k``/``v`` are rebound; a
        ``StaticKVCache`` is written at its position, which is read once: a host sync)."""
        self.core.check_input(x)
        if cache is None:
            return self.attend(x, 0)
        if cache.k.shape[0] != x.shape[0]:
            raise ValueError(f"cache batch size {cache.k.shape[0]} does not match x batch size {x.shape[0]}")
        if isinstance(cache, StaticKVCache):
            return self._prefill_static(x, cache)

        def append(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            cache.k, cache.v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            return cache.k, cache.v

        return self.attend(x, cache.pos, append)

    def _prefill_static(self, x: Tensor, cache: StaticKVCache) -> Tensor:
        start = cache.pos
        end = start + x.shape[1]
        if end > cache.max_len:
            raise ValueError(f"the static cache holds {cache.max_len} tokens; {start} written + {x.shape[1]} new")

        def write(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            cache.k[:, :, start:end] = k
            cache.v[:, :, start:end] = v
            return cache.k[:, :, :end], cache.v[:, :, :end]

        y = self.attend(x, start, write)
        cache.position.fill_(end)
        return y

    def step_static(self, x_t: Tensor, cache: StaticKVCache) -> Tensor:
        """One token ``x_t (B, 1, D)`` -> ``(B, 1, D)`` through a ``StaticKVCache``.

        Writes the token's key and value at ``cache.position`` (an index on the device),
        attends over the slots ``<= position`` and increments the position in place. Nothing is
        read back to the host, so the call can be captured in a CUDA graph and replayed; the
        caller sizes ``max_len`` (past it, the write fails: an error on the CPU, a device-side
        assert on CUDA). Input checks are metadata only (``forward``'s finiteness check syncs).
        """
        core = self.core
        if x_t.dim() != 3 or x_t.shape[1] != 1 or x_t.shape[2] != core.embed_dim:
            raise ValueError(f"x_t must have shape (batch, 1, {core.embed_dim}), got {tuple(x_t.shape)}")
        if x_t.shape[0] != cache.k.shape[0]:
            raise ValueError(f"cache batch size {cache.k.shape[0]} does not match x_t batch size {x_t.shape[0]}")
        q, k, v, lam = core.project(x_t)
        index = cache.position.view(1)
        cos, sin = core.rope.cos_sin(index, q.dtype)
        q = apply_rope(q, cos, sin, core.rope.layout)
        k = apply_rope(k, cos, sin, core.rope.layout)
        cache.k.index_copy_(2, index, k.to(cache.k.dtype))
        cache.v.index_copy_(2, index, v.to(cache.v.dtype))
        stacked = core.stack_queries(q)  # (B, Hkv, streams, 1, Dh)
        b, hkv, streams, _, d = stacked.shape
        if static_cache_kernel(x_t.device) and not torch.is_grad_enabled():
            # split over the written slots only: the kernel finds them from the position on the device, where the
            # masked SDPA below reads all max_len slots every step (the benchmarks' fair static-cache baseline);
            # forward only, so a step with autograd on keeps the SDPA path
            norm = core.head_norm if isinstance(core.head_norm, HeadwiseRMSNorm) else None
            out = fused_attention(
                stacked, cache.k, cache.v, lam, q_start=cache.position, k_offset=KEYS_FROM_ZERO,
                scale=core.softmax_scale, norm_weight=norm.weight if norm is not None else None,
                eps=norm.eps if norm is not None else 1e-6,
            )  # fmt: skip
            cache.position.add_(1)
            return core.o_proj(out.reshape(b, 1, -1))
        visible = (cache.slots <= cache.position).view(1, 1, 1, -1)
        # A group's query heads stand in for query positions: plain attention per KV head, so no
        # backend has to expand the cache for GQA (the math backend would copy all of it).
        attended = F.scaled_dot_product_attention(
            stacked.reshape(b, hkv, streams, d), cache.k, cache.v, attn_mask=visible, scale=core.softmax_scale
        )
        cache.position.add_(1)
        return core.combine(attended.view(b, hkv, streams, 1, d), lam)

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
        plan = unbounded_attention(x.device, core.differential, has_prefix=start > 0, padded=key_padding is not None)
        stacked = None
        if plan == "sdpa":
            # no cached prefix: SDPA's attention between the fused rotation and the fused combine
            cos, sin = core.rope.cos_sin(positions, torch.float32)
            stacked = rotate_and_stack(q, cos, sin, core.theta, core.num_kv_heads, core.rope.layout)
            k = rotate_and_stack(k, cos, sin, None, core.num_kv_heads, core.rope.layout).squeeze(2)
        else:
            cos, sin = core.rope.cos_sin(positions, q.dtype)
            q = apply_rope(q, cos, sin, core.rope.layout)
            k = apply_rope(k, cos, sin, core.rope.layout)
        if append is not None:
            k, v = append(k, v)
        total = k.shape[2]
        if plan == "fused":
            # both streams in one pass over K and V, the combine and head norm fused (docs/kernels.md)
            norm = core.head_norm if isinstance(core.head_norm, HeadwiseRMSNorm) else None
            out = fused_attention(
                core.stack_queries(q),
                k,
                v,
                lam,
                q_start=start,
                k_offset=total - length,
                scale=core.softmax_scale,
                norm_weight=norm.weight if norm is not None else None,
                eps=norm.eps if norm is not None else 1e-6,
            )
            return core.o_proj(out.reshape(x.shape[0], length, -1))
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
        stacked = core.stack_queries(q) if stacked is None else stacked
        attended = sdpa_stacked(stacked, k, v, core.softmax_scale, mask, is_causal=causal)
        return core.combine(attended, lam)


class BaselineGQA(_UnboundedAttention):
    """Plain grouped-query attention with RoPE and a full KV cache: the control."""

    differential = False


class CoDAGQA(_UnboundedAttention):
    """Unbounded differential attention (docs/semantics.md section 1) with a full KV cache."""

    differential = True
