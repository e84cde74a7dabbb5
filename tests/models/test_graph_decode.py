"""``GraphModelDecoder``: the whole model's step (token id in, logits out) equals the model's own forward
with a ``BoundedCache``; on the CPU it runs eagerly with Triton's interpreter, on CUDA under graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import GRAPH_CONFIG, tiny_bounded_llama

from coda_gqa_l import BoundedConfig, decode
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache, convert
from coda_gqa_l.models.graph_decode import GraphDecodeError, GraphModelDecoder
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.tiny import tiny_llama

CONFIG = GRAPH_CONFIG


def _model(device: str = "cpu", dtype: torch.dtype = torch.float32, config: BoundedConfig = CONFIG) -> torch.nn.Module:
    return tiny_bounded_llama(seed=3, device=device, dtype=dtype, config=config)


def _prefilled(model: torch.nn.Module, ids: torch.Tensor) -> BoundedCache:
    cache = BoundedCache(model, block_size=16)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    return cache


def _model_steps(model: torch.nn.Module, cache: BoundedCache, tokens: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            out.append(model(tokens[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits[:, -1].float())
    return torch.stack(out, 1)


@pytest.mark.parametrize("position_mode", ["relative", "absolute"])
def test_eager_steps_equal_the_models_forward(monkeypatch: pytest.MonkeyPatch, position_mode: str) -> None:
    """Prompt of 21 tokens, then 27 one by one: the steps at 24, 32 and 40 route (at 40 into the banks)."""
    assert dispatch.interpreting() or torch.cuda.is_available()
    torch.manual_seed(0)
    model = _model(config=dataclasses.replace(CONFIG, position_mode=position_mode))
    ids = torch.randint(0, 200, (2, 48))
    expected = _model_steps(model, _prefilled(model, ids[:, :21]), ids[:, 21:])  # the PyTorch reference path
    cache = _prefilled(model, ids[:, :21])
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")  # the step's kernels, in the interpreter on the CPU
    decoder = GraphModelDecoder(model, cache, capture=False)
    ours = torch.stack([decoder(ids[:, t]) for t in range(21, 48)], 1)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
    assert decoder.pos == 48 and all(state.pos == 48 for state in cache.states)
    assert any(bool(state.ex_filled.any()) for state in cache.states)  # the banks took tokens
    # the cache is the live state: the model's forward continues from it
    monkeypatch.delenv(dispatch.BACKEND_ENV)
    reference = _prefilled(model, ids)
    nxt = torch.randint(0, 200, (2, 1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(nxt, **cache_kwargs(cache), use_cache=True).logits,
            model(nxt, **cache_kwargs(reference), use_cache=True).logits,
            atol=2e-4,
            rtol=2e-4,
        )


def test_eager_steps_from_a_one_token_prompt_write_the_sinks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sinks 1-3 are written by the first decoded tokens: their steps must recompute the segment's extras (the kept
    ones lack the new sink), and the steps after them read the kept extras again."""
    torch.manual_seed(2)
    model = _model(config=dataclasses.replace(CONFIG, num_sink=4))
    ids = torch.randint(0, 200, (1, 20))
    expected = _model_steps(model, _prefilled(model, ids[:, :1]), ids[:, 1:])
    cache = _prefilled(model, ids[:, :1])
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    decoder = GraphModelDecoder(model, cache, capture=False)
    kinds: list[str] = []
    run = decoder._run
    monkeypatch.setattr(
        decoder, "_run", lambda states, buf, tokens, kind: kinds.append(kind) or run(states, buf, tokens, kind)
    )
    ours = torch.stack([decoder(ids[:, t]) for t in range(1, 20)], 1)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
    assert kinds[:5] == ["refresh", "refresh", "refresh", "step", "step"]
    assert kinds[6:9] == ["step", "route", "step"]  # position 8 starts a segment


def test_a_prefill_between_decodes_needs_adopt(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    model = _model()
    ids = torch.randint(0, 200, (1, 30))
    reference = _prefilled(model, ids[:, :20])
    with torch.no_grad():
        expected = model(ids[:, 20:21], **cache_kwargs(reference), use_cache=True).logits[:, -1]
    cache = _prefilled(model, ids[:, :10])
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    decoder = GraphModelDecoder(model, cache, capture=False)
    decoder(ids[:, 10])
    monkeypatch.delenv(dispatch.BACKEND_ENV)
    with torch.no_grad():
        model(ids[:, 11:20], **cache_kwargs(cache), use_cache=True)  # a follow-up question's prefill
    with pytest.raises(GraphDecodeError, match="adopt"):
        decoder(ids[:, 20])
    decoder.adopt(cache)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    torch.testing.assert_close(decoder(ids[:, 20]), expected.float(), atol=2e-4, rtol=2e-4)


def _steps_with_undone_ones(
    decoder: GraphModelDecoder, ids: torch.Tensor, start: int, junk: torch.Tensor
) -> torch.Tensor:
    """Steps of ``ids[:, start:]``, each real step after position 22 preceded by an undoable step of ``junk`` that is
    taken back (the one before position 24 would route: segments of 8)."""
    out = []
    for t in range(start, ids.shape[1]):
        if t >= 23:
            decoder(junk, undoable=True)
            decoder.undo()
        out.append(decoder(ids[:, t]))
    return torch.stack(out, 1)


def _assert_same_states(ours: BoundedCache, reference: BoundedCache, **tol: float) -> None:
    for mine, theirs in zip(ours.states, reference.states, strict=True):
        assert mine is not None and theirs is not None and mine.pos == theirs.pos
        for name, tensor in theirs.tensors().items():
            got = getattr(mine, name)
            if tensor.is_floating_point():
                torch.testing.assert_close(got, tensor, **tol, msg=lambda m, name=name: f"{name}: {m}")
            else:
                assert torch.equal(got, tensor), name


def test_an_undone_step_leaves_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps launched ahead and taken back (``undoable=True``, ``undo``), a routing one among them: the logits and
    the state are those of the steps without them."""
    torch.manual_seed(4)
    model = _model()
    ids = torch.randint(0, 200, (1, 26))
    reference = _prefilled(model, ids[:, :21])
    expected = _model_steps(model, reference, ids[:, 21:])
    cache = _prefilled(model, ids[:, :21])
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    decoder = GraphModelDecoder(model, cache, capture=False)
    ours = _steps_with_undone_ones(decoder, ids, 21, torch.tensor([7]))
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
    decoder.release()
    _assert_same_states(cache, reference, atol=2e-4, rtol=2e-4)
    with pytest.raises(GraphDecodeError, match="undo follows a step made with undoable=True"):
        decoder.adopt(cache)
        decoder.undo()


def test_a_released_cache_comes_back_in_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``release`` gives the cache views of one copy of the decoder's arena; adopting it again (a follow-up question)
    takes that copy back whole, with no per-field copies, and the steps go on as the model's forward would. A field
    replaced since (a prefill through the forward) sends the adopt through the field-by-field copy."""
    from coda_gqa_l.models import graph_decode

    torch.manual_seed(5)
    model = _model()
    ids = torch.randint(0, 200, (1, 30))
    expected = _model_steps(model, _prefilled(model, ids[:, :21]), ids[:, 21:])
    cache = _prefilled(model, ids[:, :21])
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    decoder = GraphModelDecoder(model, cache, capture=False)
    ours = [decoder(ids[:, 21])]
    decoder.release()
    states = [state for state in cache.states if state is not None]
    storages = {tensor.untyped_storage().data_ptr() for state in states for tensor in state.tensors().values()}
    assert len(storages) == 1  # every field a view of one copy
    field_copies = []
    real_copy_all = graph_decode.copy_tensors
    monkeypatch.setattr(
        graph_decode,
        "copy_tensors",
        lambda targets, sources: (field_copies.append(len(targets)), real_copy_all(targets, sources)),
    )
    decoder.adopt(cache)
    assert field_copies == []  # taken back whole
    ours += [decoder(ids[:, t]) for t in range(22, 26)]
    decoder.release()
    states[0].win_v = states[0].win_v.clone()  # replaced since the release: not the view it was given
    decoder.adopt(cache)
    assert field_copies and field_copies[0] > 0
    ours += [decoder(ids[:, t]) for t in range(26, 30)]
    torch.testing.assert_close(torch.stack(ours, 1), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
def test_captured_undone_steps_leave_no_trace() -> None:
    torch.manual_seed(4)
    model = _model("cuda")
    ids = torch.randint(0, 200, (1, 40), device="cuda")
    reference = _prefilled(model, ids[:, :21])
    expected = _model_steps(model, reference, ids[:, 21:])
    cache = _prefilled(model, ids[:, :21])
    decoder = GraphModelDecoder(model, cache)
    ours = _steps_with_undone_ones(decoder, ids, 21, torch.tensor([7], device="cuda"))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    decoder.release()
    _assert_same_states(cache, reference, atol=1e-4, rtol=1e-4)


def test_refusals_name_the_problem() -> None:
    model = _model()
    with pytest.raises(GraphDecodeError, match="CUDA"):
        GraphModelDecoder(model, _prefilled(model, torch.randint(0, 200, (1, 4))))
    with pytest.raises(GraphDecodeError, match="prefill"):
        GraphModelDecoder(model, BoundedCache(model), capture=False)
    unbounded, _ = tiny_llama(seed=3)
    with pytest.raises(GraphDecodeError, match="not a bounded CoDA layer"):
        GraphModelDecoder(convert(unbounded, None), BoundedCache(unbounded), capture=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "folded"])
def test_captured_steps_equal_the_models_forward(dtype: torch.dtype, folded: bool) -> None:
    """Folded with one row, the steps' products take the norms and the activation in their prologues (the
    default, ``kernels.step_products``); unfolded with two rows, the separate kernels."""
    torch.manual_seed(0)
    model, rows = (_folded("cuda", dtype), 1) if folded else (_model("cuda", dtype), 2)
    ids = torch.randint(0, 200, (rows, 100), device="cuda")
    expected = _model_steps(model, _prefilled(model, ids[:, :21]), ids[:, 21:])
    decoder = GraphModelDecoder(model, _prefilled(model, ids[:, :21]))
    ours = torch.stack([decoder(ids[:, t]) for t in range(21, 100)], 1)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(ours, expected, **tol)
    assert {kind for _, kind in decoder._graphs} == {"route", "refresh", "step"}


@pytest.mark.gpu
def test_decoders_capture_on_one_stream_so_more_documents_pin_no_more_cublas_workspaces() -> None:
    # PyTorch keeps a cuBLAS workspace (32 MiB on Hopper) per stream a product ran on, for the process's life: with a
    # stream per decoder, every document a database decodes would pin one more
    torch.manual_seed(0)
    model = _model("cuda", torch.bfloat16)
    ids = torch.randint(0, 200, (1, 40), device="cuda")
    first = GraphModelDecoder(model, _prefilled(model, ids))
    first(ids[:, -1])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    others = [GraphModelDecoder(model, _prefilled(model, ids)) for _ in range(3)]
    for decoder in others:
        decoder(ids[:, -1])
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    assert decode.capture_stream(torch.device("cuda")) is decode.capture_stream(torch.device("cuda", 0))
    assert added < 8 * 2**20, f"three more decoders added {added / 2**20:.1f} MiB"


def test_a_pool_lends_one_decoder_per_generation_and_leaves_each_cache_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two caches decoded one after the other through one pooled decoder, then a third at the same time as
    the second: each cache ends as the model's forward leaves it, and owns its tensors afterwards."""
    from coda_gqa_l.models.graph_decode import GraphDecoderPool

    torch.manual_seed(2)
    model = _model()
    ids = torch.randint(0, 200, (3, 44))
    rows = [ids[i : i + 1] for i in range(3)]
    expected = [_model_steps(model, _prefilled(model, r[:, :38]), r[:, 38:]) for r in rows]
    caches = [_prefilled(model, r[:, :38]) for r in rows]
    pool = GraphDecoderPool(model, capture=False)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    with pool.lend(caches[0]) as first:
        got0 = torch.stack([first(rows[0][:, t]) for t in range(38, 44)], 1)
    with pool.lend(caches[1]) as second, pool.lend(caches[2]) as third:
        assert second is first and third is not first  # the idle one is reused; a busy one is not shared
        got1, got2 = [], []
        for t in range(
            38, 44
        ):  # interleaved, through the routing step at 40,, as two questions answered at the same time
            got1.append(second(rows[1][:, t]))
            got2.append(third(rows[2][:, t]))
    for got, want in zip((got0, torch.stack(got1, 1), torch.stack(got2, 1)), expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    buffers = {id(b) for d in pool._idle for layer in d._buffers for b in layer.values()}
    assert all(id(t) not in buffers for c in caches for s in c.states for t in s.tensors().values())
    assert all(s.pos == 44 for c in caches for s in c.states)


def test_the_pool_drops_decoders_of_moved_weights_and_lends_none_it_cannot_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A captured graph has the weights' addresses baked in, and values derived from them: after a weight moves or
    changes in place, the idle decoder is dropped and a new one made. A cache a decoder refuses (routing metrics on)
    gets None and a warning: the caller decodes through the forward. A released decoder holds no cache."""
    from coda_gqa_l.models.graph_decode import GraphDecoderPool

    torch.manual_seed(3)
    model = _model()
    ids = torch.randint(0, 200, (1, 30))
    pool = GraphDecoderPool(model, capture=False)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    with pool.lend(_prefilled(model, ids)) as first:
        assert first is not None
        first(ids[:, -1])
    with pytest.raises(GraphDecodeError, match="holds no cache"):
        _ = first.pos
    with pool.lend(_prefilled(model, ids)) as again:
        assert again is first
    with torch.no_grad():
        head = model.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # same values, another address
    with pool.lend(_prefilled(model, ids)) as fresh:
        assert fresh is not None and fresh is not first
    assert pool._idle == [fresh]
    with torch.no_grad():  # weights loaded in place: the graphs' kept noise tables would be stale
        theta = model.model.layers[0].self_attn.layer.core.theta
        theta.copy_(theta + 0.01)
    with pool.lend(_prefilled(model, ids)) as reloaded:
        assert reloaded is not None and reloaded is not fresh
    cache = _prefilled(model, ids)
    for adapter in (block.self_attn for block in model.model.layers):
        adapter.layer.collect_metrics = True
    with pytest.warns(UserWarning, match="collect_metrics=True"), pool.lend(cache) as refused:
        assert refused is None


def _folded(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from coda_gqa_l.models.inference import fold_for_inference

    model = _model(device, dtype)
    folded = fold_for_inference(model)
    assert folded.attention == folded.mlps == len(model.model.layers)
    return model


def test_step_products_with_prologues_equal_the_models_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row, folded model: the norms and the activation in the products' prologues (kernels.step_products)
    through plain, refresh and route steps give the model's logits; the kernel ran for every block's products."""
    assert dispatch.interpreting() or torch.cuda.is_available()
    from coda_gqa_l.kernels import step_products

    torch.manual_seed(4)
    model = _folded()
    ids = torch.randint(0, 200, (1, 33))  # the steps at 24 and 32 route
    expected = _model_steps(model, _prefilled(model, ids[:, :21]), ids[:, 21:])
    launches: list[int] = []
    launch = step_products._launch
    monkeypatch.setattr(step_products, "_launch", lambda *a, **k: launches.append(a[-1]) or launch(*a, **k))
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    decoder = GraphModelDecoder(model, _prefilled(model, ids[:, :21]), capture=False)
    with dispatch.step_product_prologues():
        ours = torch.stack([decoder(ids[:, t]) for t in range(21, 33)], 1)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
    layers = len(model.model.layers)
    # the last step (32) routes: its attention reads the normalised row, only its MLP takes the prologues
    # (add + norm: 2, then the down product: 3); the plain step before it (31) each block's input product too
    # (norm: 1 first, add + norm: 2 after)
    assert launches[-2 * layers :] == [2, 3] * layers
    assert launches[-5 * layers : -2 * layers] == [1, 2, 3] + [2, 2, 3] * (layers - 1)
    launches.clear()
    off = GraphModelDecoder(model, _prefilled(model, ids[:, :21]), capture=False)
    with dispatch.step_product_prologues(False):
        torch.testing.assert_close(
            torch.stack([off(ids[:, t]) for t in range(21, 24)], 1), ours[:, :3], atol=2e-4, rtol=2e-4
        )
    assert not launches


@pytest.mark.parametrize("one_launch", [True, False], ids=["byte-views", "per-dtype"])
def test_batched_copies_copy_every_tensor_of_every_dtype(monkeypatch: pytest.MonkeyPatch, one_launch: bool) -> None:
    """``state.copy_tensors`` (a decoder's state kept, lent and given back; a captured prefill's buffers) sends the
    contiguous tensors as one multi-tensor copy a dtype, or (CUDA, ``ONE_LAUNCH_STATE_COPIES``) one of byte views for
    every dtype, and the others one by one: every tensor arrives, bit for bit (NaN, -0.0 and int64 extremes
    included), whatever its dtype or layout; ``zero_tensors`` clears them, and a fresh state is all zeros."""
    from coda_gqa_l import state as state_module
    from coda_gqa_l.config import BoundedConfig
    from coda_gqa_l.state import BoundedState, copy_tensors, zero_tensors

    # the byte views are for CUDA only (no launch to save on the CPU): the CPU takes them here as CUDA would
    assert state_module.ONE_LAUNCH_STATE_COPIES and not state_module._one_launch(torch.device("cpu"))
    monkeypatch.setattr(state_module, "_one_launch", lambda device: one_launch)
    sources = [
        torch.tensor([[float("nan"), -0.0, 1.5, float("-inf")]]),
        torch.tensor([torch.iinfo(torch.int64).min, -1, 0, 7, torch.iinfo(torch.int64).max]),
        torch.rand(2, 3) > 0.5,
        torch.randn(4, 6).to(torch.bfloat16),
        torch.randn(6, 4).t(),  # not contiguous
        torch.randn(7),
        torch.randn(()),  # zero-dimensional
        torch.randn(2, 0),  # empty
    ]
    targets = [torch.ones(x.shape, dtype=x.dtype) for x in sources]
    multi: list[int] = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(
        torch, "_foreach_copy_", lambda into, out_of: (multi.append(len(into)), real_copy(into, out_of))
    )
    copy_tensors(targets, sources)
    # every contiguous tensor in one launch, or one launch a dtype (float32, int64, bool, bfloat16)
    assert multi == ([len(sources) - 1] if one_launch else [4, 1, 1, 1])
    for t, s in zip(targets, sources, strict=True):
        assert t.dtype == s.dtype and torch.equal(t.reshape(-1).view(torch.uint8), s.reshape(-1).view(torch.uint8))
    with pytest.raises(ValueError):
        copy_tensors(targets[:2], sources)  # lists of different lengths
    broadcast = torch.zeros(3, 4)
    copy_tensors([broadcast], [torch.arange(4.0)])  # shapes differ: torch's own copy, which broadcasts
    assert torch.equal(broadcast, torch.arange(4.0).expand(3, 4))
    zero_tensors(targets)
    assert all(not t.reshape(-1).view(torch.uint8).any() for t in targets)
    fresh = BoundedState.empty(BoundedConfig(window=32, segment=8, num_landmarks_exact=3, num_landmarks_summary=2),
                               2, 2, 8, "cpu", torch.bfloat16)  # fmt: skip
    assert fresh.pos == 0 and all(not t.reshape(-1).view(torch.uint8).any() for t in fresh.tensors().values())
