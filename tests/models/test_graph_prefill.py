"""Reading prompts and documents through the whole model's graphs: ``GraphModelDecoder.read`` and
``graph_prefill.prefill`` give the state and logits the model's own forward gives. On the CPU the graph step runs
eagerly with Triton's interpreter; on CUDA it is captured."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import GRAPH_CONFIG, tiny_bounded_llama

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache, graph_prefill
from coda_gqa_l.models.graph_decode import GraphCaptureError, GraphDecodeError, GraphDecoderPool, GraphModelDecoder
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.state import BoundedState

CONFIG = GRAPH_CONFIG


def _model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_bounded_llama(seed=5, device=device, dtype=dtype)


def _forward(model: torch.nn.Module, cache: BoundedCache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """The model's own forward in chunks: the last token's logits."""
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            logits = model(ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True).logits[:, -1]
    return logits.float()


def _assert_same_states(ours: BoundedCache, reference: BoundedCache, **tol: Any) -> None:
    for mine, theirs in zip(ours.states, reference.states, strict=True):
        assert isinstance(mine, BoundedState) and isinstance(theirs, BoundedState)
        assert mine.pos == theirs.pos
        for name, tensor in theirs.tensors().items():
            got = getattr(mine, name)
            if tensor.dtype == torch.bool or not tensor.is_floating_point():
                assert torch.equal(got, tensor), name
            else:
                torch.testing.assert_close(got, tensor, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("forwarded", [16, 0])
def test_reading_chunks_equals_the_models_forward(monkeypatch: pytest.MonkeyPatch, forwarded: int) -> None:
    """16 tokens through the forward (or none: the empty states the forward would make, whose first read writes the
    sinks), then chunks up to position 48 and from 48 to 64: the same state and logits as the forward reading all 64,
    with the banks written on the way."""
    assert dispatch.interpreting() or torch.cuda.is_available()
    torch.manual_seed(0)
    model = _model()
    ids = torch.randint(0, 200, (2, 64))
    reference = BoundedCache(model)
    expected = _forward(model, reference, ids, 64)
    cache = BoundedCache(model)
    if forwarded:
        _forward(model, cache, ids[:, :forwarded], forwarded)
    else:
        graph_prefill.start_states(model, cache, 2)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")  # the step's kernels, in the interpreter on the CPU
    decoder = GraphModelDecoder(model, cache, capture=False)
    decoder.read(ids[:, forwarded:48])
    logits = decoder.read(ids[:, 48:64])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
    decoder.release()
    _assert_same_states(cache, reference, atol=2e-4, rtol=2e-4)
    assert any(bool(state.ex_filled.any()) for state in cache.states)
    # decode steps go on from a read: the next token's logits are the forward's
    monkeypatch.delenv(dispatch.BACKEND_ENV)
    nxt = torch.randint(0, 200, (2, 1))
    torch.testing.assert_close(_forward(model, cache, nxt, 1), _forward(model, reference, nxt, 1), atol=2e-4, rtol=2e-4)


def test_a_read_that_reaches_the_sinks_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments shorter than the sinks: a read from position 4 holds sinks 4 and 5 (its "read sinks" graph writes
    them); the next read, past the sinks, skips the write. The state and logits are the forward's."""
    torch.manual_seed(2)
    config = dataclasses.replace(GRAPH_CONFIG, segment=4, num_sink=6)
    model = tiny_bounded_llama(seed=5, config=config)
    ids = torch.randint(0, 200, (2, 28))
    reference = BoundedCache(model)
    expected = _forward(model, reference, ids, 28)
    cache = BoundedCache(model)
    _forward(model, cache, ids[:, :4], 4)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    decoder = GraphModelDecoder(model, cache, capture=False)
    kinds: list[str] = []
    real_step = decoder._step
    monkeypatch.setattr(decoder, "_step", lambda states, ids, kind: kinds.append(kind) or real_step(states, ids, kind))
    decoder.read(ids[:, 4:12])
    logits = decoder.read(ids[:, 12:28])
    assert kinds == ["read sinks", "read"]
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
    decoder.release()
    _assert_same_states(cache, reference, atol=2e-4, rtol=2e-4)


def test_a_read_must_start_and_end_on_segment_boundaries() -> None:
    model = _model()
    ids = torch.randint(0, 200, (1, 40))
    cache = BoundedCache(model)
    _forward(model, cache, ids[:, :12], 12)
    decoder = GraphModelDecoder(model, cache, capture=False)
    with pytest.raises(GraphDecodeError, match="segment boundaries"):
        decoder.read(ids[:, 12:20])  # position 12 is inside a segment
    cache = BoundedCache(model)
    _forward(model, cache, ids[:, :8], 8)
    decoder = GraphModelDecoder(model, cache, capture=False)
    with pytest.raises(GraphDecodeError, match="segment boundaries"):
        decoder.read(ids[:, 8:20])  # 12 tokens
    with pytest.raises(GraphDecodeError, match=r"\(1, n\)"):
        decoder.read(ids[0])


def _graph_prefill(
    monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, cache: BoundedCache, ids: torch.Tensor, stepped: str
) -> tuple[torch.Tensor | None, dict[str, list[int]]]:
    """``graph_prefill.prefill`` of ``ids`` in chunks of 16 with eager graph steps (the CPU stands in for CUDA) and
    at most ``stepped`` tokens a piece by steps; what went where: ``reads`` (chunk lengths), ``forwarded`` (piece
    lengths), ``steps`` (tokens stepped) and ``progress``."""
    pool = GraphDecoderPool(model, capture=False)
    monkeypatch.setattr(graph_prefill, "graph_decode_supported", lambda model: True)
    monkeypatch.setattr(graph_prefill, "shared_decoder_pool", lambda model: pool)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    monkeypatch.setenv(dispatch.READ_PIECES_ENV, "1")  # one chunk a read; the pipelined reads have their own test
    monkeypatch.setenv(dispatch.STEPPED_READ_ENV, stepped)
    seen: dict[str, list[int]] = {"reads": [], "forwarded": [], "steps": [], "progress": []}
    real_read, real_call = GraphModelDecoder.read, GraphModelDecoder.__call__
    monkeypatch.setattr(
        GraphModelDecoder,
        "read",
        lambda self, t, pieces=1: seen["reads"].append(t.shape[1]) or real_read(self, t, pieces),
    )
    monkeypatch.setattr(
        GraphModelDecoder, "__call__", lambda self, t: seen["steps"].append(t.shape[-1]) or real_call(self, t)
    )

    def forward(piece: torch.Tensor) -> torch.Tensor:
        seen["forwarded"].append(piece.shape[1])
        return model(piece, **cache_kwargs(cache), use_cache=True).logits[:, -1].float()

    with torch.no_grad():
        logits = graph_prefill.prefill(
            model, cache, ids, chunk_tokens=16, forward=forward, on_chunk=seen["progress"].append
        )
    return logits, seen


@pytest.mark.parametrize(
    ("already", "stepped", "forwarded", "steps"),
    [(0, "0", [11], 0), (5, "0", [3, 8], 0), (5, "12", [], 11)],
    ids=["empty-forward", "realigned-forward", "realigned-stepped"],
)
def test_prefill_sends_whole_aligned_chunks_through_the_graphs(
    monkeypatch: pytest.MonkeyPatch, already: int, stepped: str, forwarded: list[int], steps: int
) -> None:
    """Chunks of 16: whole chunks through ``read`` (the first one too, on empty states); a realigning piece and the
    last partial one through the forward, or one token at a time through the decode steps when they are short
    (``dispatch.stepped_read_tokens``; 5 + 3 = 8 realigns, 8 tokens are left after the reads); the state and logits
    are the forward's either way."""
    torch.manual_seed(1)
    model = _model()
    ids = torch.randint(0, 200, (1, already + 75))
    reference = BoundedCache(model)
    expected = _forward(model, reference, ids, 16)
    cache = BoundedCache(model)
    if already:
        _forward(model, cache, ids[:, :already], already)
    logits, seen = _graph_prefill(monkeypatch, model, cache, ids[:, already:], stepped)
    assert seen["forwarded"] == forwarded
    assert seen["reads"] == [16, 16, 16, 16]
    assert seen["steps"] == [1] * steps
    assert sum(seen["progress"]) == 75
    assert logits is not None
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
    _assert_same_states(cache, reference, atol=2e-4, rtol=2e-4)


def test_a_failed_step_capture_leaves_the_rest_of_the_prefill_to_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The realigning piece's second step fails to capture: the first token stays read, a warning says so, and the
    forward reads everything after it (no more graph reads); the state and logits are the forward's."""
    torch.manual_seed(2)  # routing scores at least 3.8e-4 from every threshold in both chunkings (seed 4: a tie)
    model = _model()
    ids = torch.randint(0, 200, (1, 5 + 40))
    reference = BoundedCache(model)
    expected = _forward(model, reference, ids, 16)
    cache = BoundedCache(model)
    _forward(model, cache, ids[:, :5], 5)
    real_step = GraphModelDecoder._step
    calls: list[str] = []

    def failing_step(self: GraphModelDecoder, states: Any, step_ids: torch.Tensor, kind: str) -> None:
        calls.append(kind)
        if len(calls) == 2:
            raise GraphCaptureError("capture refused (test)")
        real_step(self, states, step_ids, kind)

    monkeypatch.setattr(GraphModelDecoder, "_step", failing_step)
    with pytest.warns(UserWarning, match=r"capture refused \(test\); reading through the model's forward"):
        logits, seen = _graph_prefill(monkeypatch, model, cache, ids[:, 5:], "12")
    assert seen["steps"] == [1, 1] and seen["reads"] == []
    assert seen["forwarded"] == [16, 16, 7]
    assert sum(seen["progress"]) == 40
    assert logits is not None
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
    _assert_same_states(cache, reference, atol=2e-4, rtol=2e-4)


def _assert_pipelined_reads_equal_reads_one_by_one(
    model: torch.nn.Module, ids: torch.Tensor, *, forwarded: int, pieces: int, piece: int, capture: bool
) -> None:
    """``ids`` after its first ``forwarded`` tokens (none: from the empty states, the first read writing the sinks) read
    ``pieces`` pieces of ``piece`` tokens at a time, and again one piece a read: bit for bit the same logits and
    states (the same kernels on the same inputs), with the banks written on the way."""
    results = []
    for pipelined in (False, True):
        cache = BoundedCache(model)
        if forwarded:
            _forward(model, cache, ids[:, :forwarded], forwarded)
        else:
            graph_prefill.start_states(model, cache, ids.shape[0])
        decoder = GraphModelDecoder(model, cache, capture=capture)
        with torch.inference_mode():
            for start in range(forwarded, ids.shape[1], pieces * piece):
                if pipelined:
                    logits = decoder.read(ids[:, start : start + pieces * piece], pieces)
                else:
                    for at in range(start, start + pieces * piece, piece):
                        logits = decoder.read(ids[:, at : at + piece])
        decoder.release()
        results.append((cache, logits))
    (one_by_one, expected), (pipelined_cache, logits) = results
    assert torch.equal(logits, expected)
    _assert_same_states(pipelined_cache, one_by_one, atol=0, rtol=0)
    assert any(bool(state.ex_filled.any()) for state in pipelined_cache.states)


@pytest.mark.parametrize("forwarded", [16, 0])
def test_a_pipelined_read_equals_its_pieces_read_one_after_another(
    monkeypatch: pytest.MonkeyPatch, forwarded: int
) -> None:
    """Three 16-token pieces in one pipelined read (layer l of piece p beside layer l - 1 of piece p + 1; on the CPU
    in that order on one stream), from a forwarded prompt or from empty states."""
    torch.manual_seed(3)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    kinds: list[str] = []
    real_step = GraphModelDecoder._step

    def step(self: GraphModelDecoder, states: Any, ids: torch.Tensor, kind: str) -> None:
        kinds.append(kind)
        real_step(self, states, ids, kind)

    monkeypatch.setattr(GraphModelDecoder, "_step", step)
    ids = torch.randint(0, 200, (2, forwarded + 48))
    model = _model()
    _assert_pipelined_reads_equal_reads_one_by_one(model, ids, forwarded=forwarded, pieces=3, piece=16, capture=False)
    first = "read" if forwarded else "read sinks"
    assert kinds == [first, "read", "read", f"{first} in 3"]


def test_a_pipelined_read_needs_whole_segments_in_every_piece() -> None:
    model = _model()
    cache = BoundedCache(model)
    graph_prefill.start_states(model, cache, 1)
    decoder = GraphModelDecoder(model, cache, capture=False)
    ids = torch.randint(0, 200, (1, 48))
    with pytest.raises(GraphDecodeError, match="do not split into 4 pieces of whole 8-token segments"):
        decoder.read(ids, pieces=4)  # 12 tokens a piece
    with pytest.raises(GraphDecodeError, match="into 0 pieces"):
        decoder.read(ids, pieces=0)


def test_prefill_pipelines_read_pieces_chunks_and_reads_the_rest_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """``CODA_GQA_L_READ_PIECES=3``: 5 whole chunks of 16 go as one read of 3 pieces, then 2 reads of one; the state
    and logits are the forward's."""
    torch.manual_seed(4)
    model = _model()
    ids = torch.randint(0, 200, (1, 85))
    reference = BoundedCache(model)
    expected = _forward(model, reference, ids, 16)
    pool = GraphDecoderPool(model, capture=False)
    monkeypatch.setattr(graph_prefill, "graph_decode_supported", lambda model: True)
    monkeypatch.setattr(graph_prefill, "shared_decoder_pool", lambda model: pool)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    monkeypatch.setenv(dispatch.READ_PIECES_ENV, "3")
    reads: list[tuple[int, int]] = []
    real_read = GraphModelDecoder.read
    monkeypatch.setattr(
        GraphModelDecoder,
        "read",
        lambda self, t, pieces=1: reads.append((t.shape[1], pieces)) or real_read(self, t, pieces),
    )
    cache = BoundedCache(model)

    def forward(piece: torch.Tensor) -> torch.Tensor:
        return model(piece, **cache_kwargs(cache), use_cache=True).logits[:, -1].float()

    with torch.no_grad():
        logits = graph_prefill.prefill(model, cache, ids, chunk_tokens=16, forward=forward)
    assert reads == [(48, 3), (16, 1), (16, 1)]
    assert logits is not None
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
    _assert_same_states(cache, reference, atol=2e-4, rtol=2e-4)


def test_read_pieces_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.READ_PIECES_ENV, raising=False)
    assert dispatch.read_pieces() == dispatch.DEFAULT_READ_PIECES
    monkeypatch.setenv(dispatch.READ_PIECES_ENV, "4")
    assert dispatch.read_pieces() == 4
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(dispatch.READ_PIECES_ENV, bad)
        with pytest.raises(ValueError, match="CODA_GQA_L_READ_PIECES must be a positive whole number"):
            dispatch.read_pieces()


def test_prefill_without_graphs_is_the_chunked_forward() -> None:
    """On the CPU (no CUDA graphs) every piece goes through ``forward``, ``chunk_tokens`` at a time."""
    model = _model()
    ids = torch.randint(0, 200, (1, 40))
    cache = BoundedCache(model)
    pieces: list[int] = []

    def forward(piece: torch.Tensor) -> None:
        pieces.append(piece.shape[1])
        model(piece, **cache_kwargs(cache), use_cache=True)

    with torch.no_grad():
        assert graph_prefill.prefill(model, cache, ids, chunk_tokens=16, forward=forward) is None
    assert pieces == [16, 16, 8]
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        graph_prefill.prefill(model, cache, ids, chunk_tokens=0, forward=forward)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_reads_equal_the_models_forward(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = _model("cuda", dtype)
    ids = torch.randint(0, 200, (2, 300), device="cuda")
    reference = BoundedCache(model)
    expected = _forward(model, reference, ids, 64)
    cache = BoundedCache(model)

    def forward(piece: torch.Tensor) -> torch.Tensor:
        return model(piece, **cache_kwargs(cache), use_cache=True).logits[:, -1].float()

    with torch.inference_mode():
        logits = graph_prefill.prefill(model, cache, ids, chunk_tokens=64, forward=forward)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    assert logits is not None
    torch.testing.assert_close(logits, expected, **tol)
    _assert_same_states(cache, reference, **tol)
    pool = graph_prefill.shared_decoder_pool(model)
    # captured once, kept for the next prompt (pipelined reads key their graph "read in <pieces>")
    kinds = {kind for decoder in pool._idle for _, kind in decoder._graphs}
    assert "read" in kinds or f"read in {dispatch.read_pieces()}" in kinds


def _captured_reads_one_by_one_and_pipelined(dtype: torch.dtype) -> None:
    """Four 64-token pieces a read, twice, captured."""
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 16 + 4 * 128), device="cuda")
    _assert_pipelined_reads_equal_reads_one_by_one(
        _model("cuda", dtype), ids, forwarded=16, pieces=4, piece=64, capture=True
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_pipelined_reads_equal_reads_one_after_another(dtype: torch.dtype) -> None:
    """On CUDA the pieces' routings run on side streams, captured with the rest."""
    _captured_reads_one_by_one_and_pipelined(dtype)


@pytest.mark.gpu
def test_a_late_routing_on_its_side_stream_still_reads_its_own_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each routing held back by a sleep kernel before it on its side stream (captured with it): meanwhile the
    caller's stream goes on allocating, so an input of the routing that nothing keeps alive would be handed to
    another tensor and overwritten before the kernel reads it (the gates were, until they were kept with the chunk:
    the first pipelined reads on an H100 answered `<|endoftext|>`). The reads must still be bit for bit right."""
    from coda_gqa_l import decode

    real = decode.route_chunk_triton

    def late(*args: Any, **kwargs: Any) -> Any:
        torch.cuda._sleep(5_000_000)  # a few milliseconds of spinning on the stream the routing runs on
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "route_chunk_triton", late)
    _captured_reads_one_by_one_and_pipelined(torch.bfloat16)


def test_the_first_chunk_compiles_ahead_once_per_model_on_a_scratch_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first eager chunk's kernels compile side by side before the real forward (``compile_first_chunk_ahead``):
    once per model, on a scratch cache, leaving the caller's cache and the model's outputs as they were. On the CPU
    the interpreter compiles nothing, so the pass is skipped; with the mode standing in (launches running as usual),
    the scratch forward must still run and change nothing the caller holds."""
    import contextlib

    model = _model()
    ids = torch.randint(0, 200, (1, 2 * CONFIG.segment))
    assert not graph_prefill.compile_first_chunk_ahead(model, ids)  # the interpreter: nothing to compile
    assert not graph_prefill.compile_first_chunk_ahead(model, ids)  # and never twice

    @contextlib.contextmanager
    def standing_in() -> Any:
        yield True

    fresh = _model()
    reference = BoundedCache(fresh)
    want = _forward(fresh, reference, ids, CONFIG.segment)
    calls: list[torch.Tensor] = []
    original_forward = fresh.model.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"])
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(graph_prefill.dispatch, "compile_ahead", standing_in)
    monkeypatch.setattr(fresh.model, "forward", counting_forward)
    cache = BoundedCache(fresh)
    with torch.no_grad():
        assert graph_prefill.compile_first_chunk_ahead(fresh, ids)
        assert not graph_prefill.compile_first_chunk_ahead(fresh, ids)
    assert len(calls) == 1 and torch.equal(calls[0], ids)  # one scratch pass over the chunk, without the LM head
    assert all(state is None for state in cache.states)  # the caller's cache: untouched
    monkeypatch.setattr(fresh.model, "forward", original_forward)
    torch.testing.assert_close(_forward(fresh, cache, ids, CONFIG.segment), want, atol=0, rtol=0)
    _assert_same_states(cache, reference, atol=0, rtol=0)
