"""Reading a prompt or a document through the whole model's CUDA graphs, chunk by chunk (docs/kernels.md).

A bounded model's prefill on the GPU is launch-bound, not compute-bound: after 8K tokens one 1,024-token chunk of
SmolLM2 kept an H200 busy for 14 ms but took 103 ms of wall time for its 4,646 kernel launches
(benchmarks/results/speed.md, "Where an ingest chunk's time goes"). ``prefill`` sends every whole chunk that starts on a
segment boundary through ``GraphModelDecoder.read`` (one graph replay per chunk, captured once per chunk length
and shared through the model's decoder pool), the first one too (on empty states made up front, as the forward
would make them). The rest (a piece that realigns to a segment boundary; the last partial chunk; a prompt shorter
than a chunk) goes one token at a time through the decode step's graphs when it is short
(``dispatch.stepped_read_tokens``: a question after a saved document, the token ``generate()`` hands over) and the
state holds at least one token, else through the model's own forward. The state is the same either way: chunking
never changes a bounded model's results (docs/semantics.md section 3).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable

from torch import Tensor, nn

from ..kernels import dispatch
from .cache import BoundedCache
from .graph_decode import (
    GraphCaptureError,
    GraphModelDecoder,
    bounded_layers,
    graph_decode_supported,
    shared_decoder_pool,
)
from .hf_compat import cache_kwargs

# models whose first eager piece has had its kernels compiled ahead in this process
_COMPILED_AHEAD: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def prefill(
    model: nn.Module,
    cache: BoundedCache,
    ids: Tensor,
    *,
    chunk_tokens: int,
    forward: Callable[[Tensor], Tensor | None],
    on_chunk: Callable[[int], None] | None = None,
    decoder: GraphModelDecoder | None = None,
) -> Tensor | None:
    """Read ``ids (B, T)`` into ``cache``, ``chunk_tokens`` at a time; returns the last token's logits ``(B, vocab)``
    (``None`` if the last piece went through a ``forward`` that returns none).

    ``forward(piece)`` reads a piece through the model (the caller's choice: with or without the LM head) and
    returns its last token's logits or ``None``; ``on_chunk(tokens)`` follows progress. Whole chunks go through the
    graphs where ``graph_decode_supported(model)`` and ``chunk_tokens`` is a multiple of the segment length; a failed
    capture warns once and the rest goes through ``forward`` (the state is untouched by a failed capture).
    ``decoder``: one already lent for ``cache`` (``generation.DecodeSteps``), used instead of lending one from the
    model's pool for each run of graph work, and kept holding the cache.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    segment = bounded_layers(model)[0].config.segment if graph_decode_supported(model) else 0
    graphs = bool(segment) and chunk_tokens % segment == 0
    total, start, last = ids.shape[1], 0, None
    while start < total:
        pos = _position(cache)
        if graphs and pos % segment == 0 and total - start >= chunk_tokens:
            if not pos:
                start_states(model, cache, ids.shape[0])  # the first chunk reads through a graph too
            with _lent(model, cache, decoder) as reader:
                if reader is None:
                    graphs = False
                    continue
                try:
                    while total - start >= chunk_tokens:
                        # several chunks in one pipelined replay where the document has them (dispatch.read_pieces);
                        # the rest one at a time, so a document needs at most two captured read graphs
                        pieces = dispatch.read_pieces()
                        if total - start < pieces * chunk_tokens:
                            pieces = 1
                        tokens = pieces * chunk_tokens
                        last = reader.read(ids[:, start : start + tokens], pieces)
                        start += tokens
                        if on_chunk is not None:
                            on_chunk(tokens)
                except GraphCaptureError as error:
                    warnings.warn(f"{error}; reading through the model's forward from now on", stacklevel=2)
                    graphs = False
            continue
        take = chunk_tokens
        if graphs and pos and pos % segment:
            take = min(take, segment - pos % segment)  # realign, so the next whole chunk can replay a graph
        stepped = dispatch.stepped_read_tokens() if graphs and pos else 0  # a step follows at least one token
        if total - start <= stepped:
            take = total - start  # the whole tail by steps: no realigning piece needed
        piece = ids[:, start : start + take]
        if piece.shape[1] <= stepped:
            read, logits = _read_by_steps(model, cache, piece, decoder)
            if read < piece.shape[1]:
                graphs = False  # the pool lends no decoder, or a capture failed: the forward reads the rest
            if read:
                last = logits
                start += read
                if on_chunk is not None:
                    on_chunk(read)
            continue
        if graphs:
            compile_first_chunk_ahead(model, piece)  # once per model: the eager forward's kernels side by side
        last = forward(piece)
        start += piece.shape[1]
        if on_chunk is not None:
            on_chunk(piece.shape[1])
    return last


def _read_by_steps(
    model: nn.Module, cache: BoundedCache, piece: Tensor, decoder: GraphModelDecoder | None
) -> tuple[int, Tensor | None]:
    """``piece (B, n)`` through the decode step's graphs, one token at a time (``dispatch.stepped_read_tokens``):
    how many tokens were read, and the last one's logits. Fewer than ``n`` when the pool lends no decoder or a capture
    fails (warned; the state holds exactly the tokens read)."""
    logits = None
    with _lent(model, cache, decoder) as stepper:
        if stepper is None:
            return 0, None
        for read in range(piece.shape[1]):
            try:
                logits = stepper(piece[:, read])
            except GraphCaptureError as error:
                warnings.warn(f"{error}; reading through the model's forward from now on", stacklevel=3)
                return read, logits
    return piece.shape[1], logits


def _lent(
    model: nn.Module, cache: BoundedCache, decoder: GraphModelDecoder | None
) -> contextlib.AbstractContextManager[GraphModelDecoder | None]:
    """A context giving a decoder holding ``cache``: ``decoder`` (adopting the cache again if the forward read a piece
    since: a no-op otherwise), else one lent by the model's pool for the context's length."""
    if decoder is None:
        return shared_decoder_pool(model).lend(cache)
    decoder.adopt(cache)
    return contextlib.nullcontext(decoder)


def compile_first_chunk_ahead(model: nn.Module, piece: Tensor) -> bool:
    """Once per model and process, before its first eager piece on a GPU: that piece through the model on a scratch
    cache inside ``dispatch.compile_ahead``, so its Triton kernels compile side by side instead of one after another
    as the real forward reaches them (the demo's first ingest on a fresh H200: 76.0 s against 1.7 s in the next
    process; benchmarks/results/speed.md). Returns whether it ran (not in Triton's interpreter, nor twice).

    Inside, the kernels do not run: their outputs are uninitialised and flow on through torch's operations, which in
    the bounded forward only compute with them (every index it gathers or writes with comes from positions, never
    from a kernel's output) and are thrown away with the scratch cache."""
    if model in _COMPILED_AHEAD:
        return False
    _COMPILED_AHEAD.add(model)
    base = getattr(model, "model", model)  # no LM head: a product, nothing to compile
    with dispatch.compile_ahead() as compiling:
        if not compiling:
            return False
        scratch = BoundedCache(model, block_size=piece.shape[1])
        try:
            base(input_ids=piece, **cache_kwargs(scratch), use_cache=True)
        except Exception:  # noqa: BLE001
            # a check on values the skipped kernels never wrote may fail; the kernels launched before it still compile,
            # and the real forward that follows reports any error of its own
            pass
    return True


def start_states(model: nn.Module, cache: BoundedCache, batch_size: int) -> None:
    """Every layer's empty state, as the forward creates them on its first chunk: a graph read from position 0 on
    them gives the forward's state and logits (the "read sinks" graph writes the sinks), so a document's first chunk
    need not pay the eager forward's launches (about 90 ms of host time for SmolLM2 on an H200)."""
    for index, layer in enumerate(bounded_layers(model)):
        cache.state_for(index, layer, batch_size)


def _position(cache: BoundedCache) -> int:
    """Tokens the cache holds (0 before its first prefill)."""
    state = cache.states[0] if cache.states else None
    return 0 if state is None else state.pos
