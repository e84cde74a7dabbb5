"""``CapturedPrefill`` gives what ``layer.prefill_chunked`` gives: replayed from CUDA graphs on a GPU (its chunks
pipelined in pieces, their routing on side streams), and eagerly (``capture=False``, the Triton kernels in the
interpreter) on the CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import record_rotated_forwards, token_like

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.state import TENSOR_FIELDS, BoundedState


def _layer(sinks: int, window: int, exact: int, summary: int, dim: int, heads: int) -> BoundedCoDAAttention:
    torch.manual_seed(0)
    config = BoundedConfig(
        window=window, num_landmarks_exact=exact, num_landmarks_summary=summary, num_sink=sinks, max_inserts=4
    )
    layer = BoundedCoDAAttention(dim, heads, 2, config=config)
    with torch.no_grad():
        layer.gate_proj.weight.mul_(4.0)  # gates spread over (0, 1): inserts, hits and EMA moves all happen
    return layer


def _assert_states_close(ours: BoundedState, eager: BoundedState, **tol: float) -> None:
    assert ours.pos == eager.pos
    for name in TENSOR_FIELDS:
        a, b = getattr(ours, name), getattr(eager, name)
        if a.dtype in (torch.bool, torch.int64, torch.int32):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)


def test_captured_prefill_refuses_a_cpu_layer_and_a_chunk_across_segments() -> None:
    from coda_gqa_l.captured_prefill import CapturedPrefill

    layer = _layer(0, 16, 4, 2, 32, 4)
    with pytest.raises(ValueError, match="CUDA"):
        CapturedPrefill(layer)
    with pytest.raises(ValueError, match="multiple of the segment"):
        CapturedPrefill(layer, chunk=layer.config.segment + 1, capture=False)
    for weights in ((1, 2), (1, 0, 1), [1, 2, 1], (1, 2.0, 1)):
        with pytest.raises(ValueError, match="weights must be a tuple of 3 positive ints"):
            CapturedPrefill(layer, chunk=48, pieces=3, weights=weights, capture=False)  # type: ignore[arg-type]


def test_pieces_are_whole_segments_in_the_weights_proportions() -> None:
    """``weights`` size the pieces in whole segments (largest remainders first); a chunk of fewer segments than
    weights falls back to equal pieces; sinks beyond a small first piece make one piece."""
    from coda_gqa_l.captured_prefill import CapturedPrefill

    S = 8
    layer = _layer(3, 32, 6, 4, 64, 4)
    assert layer.config.segment == S
    prefill = CapturedPrefill(layer, chunk=96, pieces=3, weights=(1, 4, 1), capture=False)
    assert prefill.piece_sizes(48, sinks=False) == [S, 4 * S, S]
    assert prefill.piece_sizes(96, sinks=False) == [2 * S, 8 * S, 2 * S]
    assert prefill.piece_sizes(56, sinks=False) == [S, 5 * S, S]  # 7 segments: 1.17 / 4.67 / 1.17
    assert prefill.piece_sizes(16, sinks=False) == [S, S]  # 2 segments: equal pieces
    assert prefill.piece_sizes(48, sinks=True) == [S, 4 * S, S]  # 3 sinks fit the first piece's 8 tokens
    assert prefill.pieces_for(48, sinks=False) == 3
    wide_sinks = _layer(20, 64, 6, 4, 64, 4)
    assert CapturedPrefill(wide_sinks, chunk=96, pieces=3, weights=(1, 4, 1), capture=False).piece_sizes(
        96, sinks=True
    ) == [96]  # 20 sinks would reach past the first piece's 16 tokens


def test_the_layer_signature_changes_with_the_tensors_the_graphs_read() -> None:
    """The signature the graphs are checked against (its tensor list cached between registrations) changes when a
    parameter is written in place, replaced under its name, given other storage or moved, and a buffer replaced;
    calls with nothing changed give the same signature."""
    from coda_gqa_l.captured_prefill import _LayerSignature

    layer = _layer(0, 16, 4, 2, 32, 4)
    signature = _LayerSignature(layer)
    before = signature()
    assert signature() == before
    with torch.no_grad():
        layer.core.q_proj.weight.add_(1.0)  # in place: its version
    assert (after_write := signature()) != before
    layer.core.q_proj.weight = torch.nn.Parameter(layer.core.q_proj.weight.detach().clone())  # replaced by name
    assert (after_replace := signature()) != after_write
    layer.core.q_proj.weight.data = layer.core.q_proj.weight.detach().clone()  # other storage, same Parameter
    assert (after_data := signature()) != after_replace
    layer.to(torch.float64)  # moved: every parameter's storage
    assert (after_move := signature()) != after_data
    name = next(name for name, _ in layer.named_buffers())
    owner = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
    owner.register_buffer(name.rpartition(".")[2], getattr(owner, name.rpartition(".")[2]).clone())
    assert signature() != after_move
    assert signature() == signature()


@pytest.mark.parametrize(
    ("sinks", "before", "pieces", "weights"), [(0, 13, 3, None), (2, 0, 3, (1, 4, 1))]
)  # sinks: the batch-size test below
def test_eager_captured_prefill_equals_the_layers_prefill(
    monkeypatch: pytest.MonkeyPatch, sinks: int, before: int, pieces: int, weights: tuple[int, ...] | None
) -> None:
    """From a state mid-segment (its head through the layer's own prefill): segment-aligned chunks of 48 tokens in
    pieces, a shorter aligned chunk, then a tail under a segment; outputs and every state field as
    ``prefill_chunked`` leaves them, the handed state untouched."""
    assert dispatch.interpreting() or torch.cuda.is_available()
    from coda_gqa_l.captured_prefill import CapturedPrefill

    layer = _layer(sinks, 32, 6, 4, 64, 4)
    x = token_like(2, before + 110, 64, seed=3)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")  # the graph step's kernels, in the interpreter on the CPU
    with torch.no_grad():
        start = layer.init_state(2)
        if before:
            _, start = layer.prefill_chunked(x[:, :before], start, block_size=16)
        eager_y, eager = layer.prefill_chunked(x[:, before:], start.clone(), block_size=48)
        kept = start.clone()
        prefill = CapturedPrefill(layer, chunk=48, pieces=pieces, weights=weights, capture=False)
        ours_y, ours = prefill(x[:, before:], start, write_cache=False)
    assert ours is not start and start.pos == before
    _assert_states_close(start, kept, atol=0, rtol=0)
    assert ours_y is not None
    torch.testing.assert_close(ours_y, eager_y, atol=2e-4, rtol=2e-4)
    _assert_states_close(ours, eager, atol=2e-4, rtol=2e-4)
    assert bool(ours.ex_filled.any()) and bool(ours.sm_filled.any())


@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["interpreter", "gpu"])
def test_rotation_in_the_forward_leaves_the_prefill_as_it_was(monkeypatch: pytest.MonkeyPatch, on_gpu: bool) -> None:
    """With RoPE and the noise rotation in the attention forward's prologue (``diff_attention.ROTATE_IN_FORWARD``)
    the captured prefill (eager in the interpreter; captured, bfloat16, on a GPU) gives what the layer's prefill
    gives with the stacking pass, and the forward really took the projected queries."""
    from coda_gqa_l.captured_prefill import CapturedPrefill
    from coda_gqa_l.kernels import diff_attention

    if not on_gpu:
        monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    layer = _layer(3, 32, 6, 4, 64, 4)
    x = token_like(1, 100, 64, seed=5)
    tol = dict(atol=2e-4, rtol=2e-4)
    if on_gpu:
        layer, x, tol = layer.cuda().to(torch.bfloat16), x.cuda().to(torch.bfloat16), dict(atol=3e-2, rtol=3e-2)
    rotated = record_rotated_forwards(monkeypatch)
    with torch.inference_mode():
        monkeypatch.setattr(diff_attention, "ROTATE_IN_FORWARD", False)
        eager_y, eager = layer.prefill_chunked(x, layer.init_state(1), block_size=32)
        assert rotated and not any(rotated)
        monkeypatch.setattr(diff_attention, "ROTATE_IN_FORWARD", True)
        ours_y, ours = CapturedPrefill(layer, chunk=32, pieces=2, capture=on_gpu)(x, layer.init_state(1))
    assert any(rotated)
    assert ours_y is not None
    torch.testing.assert_close(ours_y, eager_y, **tol)
    _assert_states_close(ours, eager, **tol)


def test_sm_carveout_sets_torchs_carveout_inside_and_restores_it() -> None:
    from coda_gqa_l.decode import sm_carveout
    from coda_gqa_l.kernels.routing import routing_programs

    assert routing_programs(2, 8, followers=True) == 64 and routing_programs(1, 8, followers=False) == 16
    before = torch._C._get_sm_carveout_experimental()
    with sm_carveout(24):
        assert torch._C._get_sm_carveout_experimental() == 24
        with sm_carveout(None):  # no change
            assert torch._C._get_sm_carveout_experimental() == 24
    assert torch._C._get_sm_carveout_experimental() == before
    with pytest.raises(RuntimeError, match="inside"), sm_carveout(8):
        raise RuntimeError("inside")
    assert torch._C._get_sm_carveout_experimental() == before


@pytest.mark.gpu
@pytest.mark.parametrize("carveout", [False, True], ids=["all-sms", "carveout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sinks", [0, 3])
def test_captured_prefill_equals_the_layers_prefill(
    dtype: torch.dtype, sinks: int, carveout: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two calls, the second from the first's state (mid-segment: head, chunks, tail) replaying the graphs the first
    captured; under ``torch.inference_mode`` as a server runs it. With ``dispatch.product_carveout`` the graphs of
    several pieces are captured with torch's SM carveout set to the routing's programs."""
    from coda_gqa_l.captured_prefill import CapturedPrefill

    layer = _layer(sinks, 64, 12, 8, 128, 8).cuda().to(dtype)
    x = token_like(2, 2000, 128, seed=1).cuda().to(dtype)
    prefill = CapturedPrefill(layer, chunk=512, pieces=4)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    carveouts: list[int | None] = []
    setter = torch._C._set_sm_carveout_experimental
    monkeypatch.setattr(torch._C, "_set_sm_carveout_experimental", lambda n: (carveouts.append(n), setter(n))[1])
    with torch.inference_mode(), dispatch.product_carveout(carveout):
        eager_y1, eager = layer.prefill_chunked(x[:, :1100], layer.init_state(2), block_size=512)
        eager_y2, eager = layer.prefill_chunked(x[:, 1100:], eager, block_size=512)
        ours_y1, ours = prefill(x[:, :1100], layer.init_state(2))
        first = {(512, True), (512, False), (64, False)} if sinks else {(512, False), (64, False)}
        assert set(prefill._graphs) == first
        ours_y2, ours = prefill(x[:, 1100:], ours)
    assert set(prefill._graphs) == first | {(384, False)}  # the second call's head went eagerly: 4 tokens
    # 2 rows x 2 KV heads x 4 routing programs, set (then restored) for each capture: each has several pieces
    assert carveouts[::2] == ([16] * len(prefill._graphs) if carveout else [])
    assert ours_y1 is not None and ours_y2 is not None
    torch.testing.assert_close(ours_y1, eager_y1, **tol)
    torch.testing.assert_close(ours_y2, eager_y2, **tol)
    _assert_states_close(ours, eager, **tol)
    assert bool(ours.ex_filled.any()) and bool(ours.sm_filled.any())


@pytest.mark.gpu
def test_captured_prefill_keeps_what_it_was_handed_and_counts_pieces() -> None:
    from coda_gqa_l.captured_prefill import CapturedPrefill

    layer = _layer(3, 64, 12, 8, 128, 8).cuda().to(torch.bfloat16)
    x = token_like(1, 1024, 128, seed=4).cuda().to(torch.bfloat16)
    prefill = CapturedPrefill(layer, chunk=256, pieces=4)
    assert prefill.pieces_for(256, sinks=False) == 4 and prefill.pieces_for(144, sinks=False) == 3
    with torch.inference_mode():
        _, state = layer.prefill_chunked(x[:, :320], layer.init_state(1), block_size=128)
        kept = state.clone()
        _, advanced = prefill(x[:, 320:], state, write_cache=False, return_outputs=False)
        graphs = dict(prefill._graphs)
        _, again = prefill(x[:, 320:], state, write_cache=False, return_outputs=False)
    assert prefill._graphs == graphs  # replayed, not captured again
    assert advanced.pos == again.pos == 1024 and state.pos == 320
    _assert_states_close(state, kept, atol=0, rtol=0)
    _assert_states_close(advanced, again, atol=0, rtol=0)  # the same replays from the same state: bit for bit


def test_eager_captured_prefill_makes_new_buffers_for_another_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a fresh state (the chunk writes 3 sinks, in the first of its 2 pieces) with batch 1, then with batch 2:
    the second call's buffers (and graphs) are new, and both give what ``prefill_chunked`` gives."""
    from coda_gqa_l.captured_prefill import CapturedPrefill

    layer = _layer(3, 32, 6, 4, 64, 4)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    prefill = CapturedPrefill(layer, chunk=16, capture=False)
    with torch.no_grad():
        for batch in (1, 2):
            x = token_like(batch, 16, 64, seed=batch)
            eager_y, eager = layer.prefill_chunked(x, layer.init_state(batch), block_size=16)
            ours_y, ours = prefill(x, layer.init_state(batch))
            assert ours_y is not None and prefill._arena is not None and prefill._arena.batch_size == batch
            torch.testing.assert_close(ours_y, eager_y, atol=2e-4, rtol=2e-4)
            _assert_states_close(ours, eager, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["interpreter", "gpu"])
def test_a_fresh_prefill_needs_no_state(monkeypatch: pytest.MonkeyPatch, on_gpu: bool) -> None:
    """``state=None`` after a call that left another document's state in the buffers gives what ``prefill_chunked``
    gives from ``init_state`` (the buffers zeroed, not left as they were), and so does a call of fewer tokens than a
    segment (no graph)."""
    from coda_gqa_l.captured_prefill import CapturedPrefill

    layer = _layer(3, 32, 6, 4, 64, 4)
    x, other = token_like(1, 40, 64, seed=5), token_like(1, 64, 64, seed=6)
    tol = dict(atol=2e-4, rtol=2e-4)
    if on_gpu:
        layer, x, other = layer.cuda().to(torch.bfloat16), x.cuda().to(torch.bfloat16), other.cuda().to(torch.bfloat16)
        tol = dict(atol=3e-2, rtol=3e-2)
    else:
        monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    prefill = CapturedPrefill(layer, chunk=16, capture=on_gpu)
    with torch.inference_mode():
        _, dirty = prefill(other)
        assert prefill._arena is not None and bool(prefill._arena.ex_filled.any()) and dirty.pos == 64
        eager_y, eager = layer.prefill_chunked(x, layer.init_state(1), block_size=16)
        ours_y, ours = prefill(x)
        short_eager_y, short_eager = layer.prefill_chunked(x[:, :5], layer.init_state(1), block_size=16)
        short_y, short = prefill(x[:, :5])
    assert ours_y is not None and short_y is not None
    torch.testing.assert_close(ours_y, eager_y, **tol)
    _assert_states_close(ours, eager, **tol)
    torch.testing.assert_close(short_y, short_eager_y, **tol)
    _assert_states_close(short, short_eager, **tol)


@pytest.mark.gpu
def test_captured_prefill_keeps_its_most_recent_graphs_and_recaptures_after_the_layer_changed() -> None:
    """``max_graphs=1``: each new length drops the graph before it (the shared pool stays in use through the
    capture); weights loaded in place drop every graph, and the next call gives the new weights' outputs."""
    from coda_gqa_l.captured_prefill import CapturedPrefill

    layer = _layer(0, 64, 12, 8, 128, 8).cuda().to(torch.bfloat16)
    x = token_like(1, 512, 128, seed=5).cuda().to(torch.bfloat16)
    prefill = CapturedPrefill(layer, chunk=256, max_graphs=1)
    with torch.inference_mode():
        for length in (256, 192, 256):
            prefill(x[:, :length], layer.init_state(1))
            assert list(prefill._graphs) == [(length, False)]
        graph = prefill._graphs[(256, False)]
        with torch.no_grad():
            layer.core.theta.mul_(0.5)  # in place: same storage, new version (and new noise tables)
        ours_y, _ = prefill(x[:, :256], layer.init_state(1))
        eager_y, _ = layer.prefill_chunked(x[:, :256], layer.init_state(1), block_size=256)
    assert prefill._graphs[(256, False)] is not graph
    assert ours_y is not None
    torch.testing.assert_close(ours_y, eager_y, atol=3e-2, rtol=3e-2)
