"""Perplexity of a causal LM on a token sequence, read as a stream through its cache.

The sequence is fed in chunks; each chunk continues the cache left by the previous one, so a
bounded model reads the document through its fixed-size state exactly as it would in use,
and an unbounded model through its full cache. The first token has no prediction; every
other token's negative log-likelihood is counted once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.hf_compat import cache_kwargs


@torch.no_grad()
def stream_nll(
    model: torch.nn.Module, ids: Tensor, cache: Any = None, chunk: int = 512, progress: bool = False
) -> Tensor:
    """Per-token negative log-likelihoods (float64, length ``L - 1``) of ``ids (1, L)``.

    ``cache`` is any transformers cache (a ``BoundedCache`` for bounded models); ``None`` runs
    the whole sequence in one forward pass.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, L), got {tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise ValueError("need at least 2 tokens")
    device = next(model.parameters()).device
    ids = ids.to(device)
    if cache is None:
        logits = model(ids, use_cache=False).logits[0, :-1]
        return F.cross_entropy(logits.double(), ids[0, 1:], reduction="none")
    losses = []
    carry: Tensor | None = None  # logits of the last token of the previous chunk
    starts = range(0, ids.shape[1], chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="perplexity", unit="chunk")
    for start in starts:
        piece = ids[:, start : start + chunk]
        logits = model(piece, **cache_kwargs(cache), use_cache=True).logits[0]
        if carry is not None:
            losses.append(F.cross_entropy(carry[None].double(), piece[0, :1], reduction="none"))
        if piece.shape[1] > 1:
            losses.append(F.cross_entropy(logits[:-1].double(), piece[0, 1:], reduction="none"))
        carry = logits[-1]
    return torch.cat(losses)


def stream_perplexity(model: torch.nn.Module, ids: Tensor, cache: Any = None, chunk: int = 512) -> float:
    """``exp`` of the mean negative log-likelihood (see ``stream_nll``)."""
    return math.exp(stream_nll(model, ids, cache, chunk).mean().item())
