"""Perplexity of a causal LM on a token sequence, read as a stream through its cache.

The sequence is fed in chunks; each chunk continues the cache left by the previous one, so a
bounded model reads the document through its fixed-size state exactly as it would in use,
and an unbounded model through its full cache. The first token has no prediction; every
other token's negative log-likelihood is counted once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import bible_text, load_wikipedia
from ..data.tokens import token_stream
from ..models.cache import new_cache
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


def perplexity_rows(
    model: nn.Module,
    bounded: bool,
    ids: torch.Tensor,
    lengths: Sequence[int],
    chunk: int = 1024,
    deadline: float | None = None,
) -> list[dict]:
    """Perplexity of the same tokens at every context length: ``ids`` (the longest length) cut
    into windows of each of ``lengths`` tokens, each read from an empty state as a stream in pieces of
    ``chunk`` tokens.

    Only positions that are predicted at every length are scored (every position but those at a
    multiple of the shortest length), so the lengths differ in context alone. Lengths not begun
    by ``deadline`` (``time.monotonic()``) are marked skipped.
    """
    total, shortest = ids.shape[1], min(lengths)
    scored = torch.arange(1, total) % shortest != 0
    rows: list[dict] = []
    for length in lengths:
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"length": length, "status": "skipped (time budget)"})
            continue
        began = time.perf_counter()
        pieces = []
        for start in range(0, total, length):
            window = ids[:, start : start + length]
            nll = stream_nll(model, window, new_cache(model, bounded, chunk), chunk=chunk)
            # position start + 1 + i of the text; the window's first token has no prediction
            pieces.append(torch.cat([nll.new_full((1,), math.nan), nll]) if start else nll)
        nll = torch.cat(pieces)[scored]
        rows.append({"length": length, "windows": total // length, "scored_tokens": int(nll.numel()),
                     "ppl": math.exp(nll.mean().item()), "seconds": time.perf_counter() - began})  # fmt: skip
    return rows


def check_lengths(lengths: list[int]) -> None:
    """Every length must divide the longest and be a multiple of the shortest (same tokens)."""
    longest, shortest = max(lengths), min(lengths)
    bad = [n for n in lengths if longest % n or n % shortest]
    if bad:
        raise ValueError(f"--lengths {bad} must divide the longest ({longest}) and be multiples of the shortest")


def perplexity_texts(names: Sequence[str], tokens: int, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The first ``tokens`` tokens ``(1, tokens)`` of each perplexity text (``wikipedia``: the held-out
    articles; ``bible``: the King James Bible as one document). Raises if a text is shorter."""
    sources = {
        "wikipedia": lambda: [d.text for d in load_wikipedia("heldout")],
        # a prefix is enough (a token is ~4 characters) and tokenizing all 4 MB takes a while
        "bible": lambda: [bible_text()[: 16 * tokens]],
    }
    texts = {}
    for name in names:
        if name not in sources:
            raise ValueError(f"unknown perplexity text {name!r}; choose from {sorted(sources)}")
        ids = token_stream(sources[name](), tokenizer)
        if len(ids) < tokens:
            raise ValueError(f"the {name} text has {len(ids)} tokens, fewer than asked ({tokens})")
        texts[name] = torch.tensor([ids[:tokens]])
    return texts
