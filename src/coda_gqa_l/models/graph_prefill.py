"""Reading a prompt or a document through the whole model's CUDA graphs, chunk by chunk (docs/kernels.md).

A bounded model's prefill on the GPU is launch-bound, not compute-bound: after 8K tokens one 1,024-token chunk of
SmolLM2 kept an H200 busy for 14 ms but took 103 ms of wall time for its 4,646 kernel launches
(benchmarks/results/speed.md, "Where an ingest chunk's time goes"). ``prefill`` sends every whole chunk that starts on a
segment boundary through ``GraphModelDecoder.read`` (one graph replay per chunk, captured once per chunk length
and shared through the model's decoder pool) and the rest (the first chunk, which creates the states and writes
the sinks; a piece that realigns to a segment boundary; the last partial chunk) through the model's own forward.
The state is the same either way: chunking never changes a bounded model's results (docs/semantics.md section 3).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor, nn

from .cache import BoundedCache
from .graph_decode import GraphCaptureError, bounded_layers, graph_decode_supported, shared_decoder_pool


def prefill(
    model: nn.Module,
    cache: BoundedCache,
    ids: Tensor,
    *,
    chunk_tokens: int,
    forward: Callable[[Tensor], Tensor | None],
    on_chunk: Callable[[int], None] | None = None,
) -> Tensor | None:
    """Read ``ids (B, T)`` into ``cache``, ``chunk_tokens`` at a time; returns the last token's logits ``(B, vocab)``
    (``None`` if the last piece went through a ``forward`` that returns none).

    ``forward(piece)`` reads a piece through the model (the caller's choice: with or without the LM head) and
    returns its last token's logits or ``None``; ``on_chunk(tokens)`` follows progress. Whole chunks go through the
    graphs where ``graph_decode_supported(model)`` and ``chunk_tokens`` is a multiple of the segment length; a failed
    capture warns once and the rest goes through ``forward`` (the state is untouched by a failed capture).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    segment = bounded_layers(model)[0].config.segment if graph_decode_supported(model) else 0
    graphs = bool(segment) and chunk_tokens % segment == 0
    total, start, last = ids.shape[1], 0, None
    while start < total:
        pos = _position(cache)
        if graphs and pos and pos % segment == 0 and total - start >= chunk_tokens:
            with shared_decoder_pool(model).lend(cache) as decoder:
                if decoder is None:
                    graphs = False
                    continue
                try:
                    while total - start >= chunk_tokens:
                        last = decoder.read(ids[:, start : start + chunk_tokens])
                        start += chunk_tokens
                        if on_chunk is not None:
                            on_chunk(chunk_tokens)
                except GraphCaptureError as error:
                    warnings.warn(f"{error}; reading through the model's forward from now on", stacklevel=2)
                    graphs = False
            continue
        take = chunk_tokens
        if graphs and pos and pos % segment:
            take = min(take, segment - pos % segment)  # realign, so the next whole chunk can replay a graph
        piece = ids[:, start : start + take]
        last = forward(piece)
        start += piece.shape[1]
        if on_chunk is not None:
            on_chunk(piece.shape[1])
    return last


def _position(cache: BoundedCache) -> int:
    """Tokens the cache holds (0 before its first prefill)."""
    state = cache.states[0] if cache.states else None
    return 0 if state is None else state.pos
