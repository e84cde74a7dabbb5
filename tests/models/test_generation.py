"""``bounded_generate``: the same tokens as transformers' ``generate`` with a ``BoundedCache``, through the forward
and through the whole-model decoder's step (run eagerly in Triton's interpreter on the CPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from coda_gqa_l import BoundedConfig
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache, bounded_decoding, bounded_generate, convert
from coda_gqa_l.models import graph_decode as graph_decode_module
from coda_gqa_l.models.graph_decode import shared_decoder_pool
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.tiny import tiny_llama

CONFIG = BoundedConfig(window=32, segment=8, num_landmarks_exact=4, num_landmarks_summary=4, num_sink=2)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model, _ = tiny_llama(seed=5)
    model = convert(model, CONFIG).eval()
    with torch.no_grad():  # sharper logits than the random init's, so greedy ties cannot decide
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture()
def graph_path_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[object]]:
    """Calling it switches generation to the decode path of a CUDA machine, on the CPU: graph decoders built with
    ``capture=False`` (their step run eagerly, its kernels in Triton's interpreter). It returns the list that
    collects every decoder made from then on."""

    def switch() -> list[object]:
        made: list[object] = []
        original_init = graph_decode_module.GraphModelDecoder.__init__

        def eager_init(self, model, cache, *, capture=True):  # type: ignore[no-untyped-def]
            made.append(self)
            original_init(self, model, cache, capture=False)

        monkeypatch.setattr("coda_gqa_l.models.generation.graph_decode_supported", lambda model: True)
        monkeypatch.setattr(graph_decode_module.GraphModelDecoder, "__init__", eager_init)
        monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
        return made

    return switch


def test_greedy_tokens_equal_transformers_generate(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 200, (2, 50), generator=torch.Generator().manual_seed(0))
    eos = model.generation_config.eos_token_id  # transformers stops a row there and pads it with the same token
    ours = bounded_generate(model, ids, 20, chunk_tokens=16, eos_token_id=eos)
    with torch.no_grad():
        theirs = model.generate(ids, **cache_kwargs(BoundedCache(model)), do_sample=False, max_new_tokens=20)
    assert torch.equal(ours, theirs)


def test_the_graph_step_gives_the_forwards_tokens(
    model: torch.nn.Module, graph_path_on_the_cpu: Callable[[], list[object]]
) -> None:
    """The decode path of a CUDA machine, run eagerly: the same tokens, and the cache is left holding its own
    tensors at the same position."""
    ids = torch.randint(0, 200, (1, 27), generator=torch.Generator().manual_seed(1))
    forward_cache = BoundedCache(model)
    expected = bounded_generate(model, ids, 24, cache=forward_cache, chunk_tokens=16)
    assert graph_path_on_the_cpu() is not None
    graph_cache = BoundedCache(model)
    assert torch.equal(bounded_generate(model, ids, 24, cache=graph_cache, chunk_tokens=16), expected)
    assert [s.pos for s in graph_cache.states] == [s.pos for s in forward_cache.states] == [27 + 23] * 2


def test_rows_stop_at_the_end_token_and_sampling_is_seeded(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(2))
    free = bounded_generate(model, ids, 12)
    eos = int(free[0, 30 + 3])  # the fourth new token
    stopped = bounded_generate(model, ids, 12, eos_token_id=eos)
    first = free[0, 30:].tolist().index(eos)
    assert torch.equal(stopped, free[:, : 30 + first + 1])  # the same tokens, up to and with the end token
    a = bounded_generate(model, ids, 8, temperature=1.0, seed=3)
    assert torch.equal(a, bounded_generate(model, ids, 8, temperature=1.0, seed=3))
    with pytest.raises(ValueError, match="temperature"):
        bounded_generate(model, ids, 8, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(batch, length >= 1\)"):
        bounded_generate(model, ids[0], 8)


# ---------------------------------------------------------------- generate(custom_generate=bounded_decoding)
def _generate(model: torch.nn.Module, ids: torch.Tensor, cache: object, **kwargs: object) -> object:
    with torch.no_grad():
        return model.generate(ids, **cache_kwargs(cache), **kwargs)  # type: ignore[operator]


def test_generate_with_our_loop_gives_transformers_tokens(model: torch.nn.Module) -> None:
    """Greedy, and sampled with a repetition penalty and top-k (the same random draws): transformers' own loop and
    ours, each with a fresh BoundedCache, give the same tokens and leave the caches at the same position."""
    ids = torch.randint(0, 200, (2, 50), generator=torch.Generator().manual_seed(4))
    for settings in ({"do_sample": False}, {"do_sample": True, "top_k": 20, "repetition_penalty": 1.3}):
        runs = []
        for custom in (None, bounded_decoding):
            cache = BoundedCache(model)
            torch.manual_seed(11)
            out = _generate(model, ids, cache, max_new_tokens=18, custom_generate=custom, **settings)
            runs.append((out, [state.pos for state in cache.states]))
        assert torch.equal(runs[0][0], runs[1][0]), settings
        assert runs[0][1] == runs[1][1] == [50 + 17] * 2


def test_generate_with_our_loop_stops_and_returns_a_dict(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(5))
    free = _generate(model, ids, BoundedCache(model), max_new_tokens=12, do_sample=False)
    assert isinstance(free, torch.Tensor)
    eos = int(free[0, 40 + 4])  # the fifth new token ends the answer
    out = _generate(
        model,
        ids,
        BoundedCache(model),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        custom_generate=bounded_decoding,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    new = free[0, 40:].tolist()
    expected = free[:, : 40 + new.index(eos) + 1]
    assert torch.equal(out.sequences, expected)  # type: ignore[attr-defined]
    assert len(out.scores) == len(out.logits) == expected.shape[1] - 40  # type: ignore[attr-defined]
    assert isinstance(out[-1], BoundedCache)  # the cache, under either release's field name


def test_generate_with_our_loop_continues_a_filled_cache(model: torch.nn.Module) -> None:
    """input_ids repeats what the cache has seen (transformers' convention); only the rest is prefilled."""
    ids = torch.randint(0, 200, (1, 60), generator=torch.Generator().manual_seed(6))
    whole = _generate(
        model, ids, BoundedCache(model), max_new_tokens=10, do_sample=False, custom_generate=bounded_decoding
    )
    cache = BoundedCache(model)
    with torch.no_grad():
        model(ids[:, :35], **cache_kwargs(cache), use_cache=True)
    continued = _generate(model, ids, cache, max_new_tokens=10, do_sample=False, custom_generate=bounded_decoding)
    assert torch.equal(continued, whole)
    with pytest.raises(ValueError, match="the cache has seen 69 tokens and input_ids holds 60"):
        _generate(model, ids, cache, max_new_tokens=2, custom_generate=bounded_decoding)


def test_generate_with_our_loop_refuses_what_it_does_not_do(model: torch.nn.Module) -> None:
    from transformers import DynamicCache

    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="decodes a BoundedCache, got DynamicCache"):
        _generate(model, ids, DynamicCache(), max_new_tokens=2, custom_generate=bounded_decoding)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="unpadded rows"):
        _generate(
            model, ids, BoundedCache(model), attention_mask=mask, max_new_tokens=2, custom_generate=bounded_decoding
        )
    with pytest.raises(ValueError, match="no attentions or hidden states"):
        _generate(
            model,
            ids,
            BoundedCache(model),
            max_new_tokens=2,
            custom_generate=bounded_decoding,
            return_dict_in_generate=True,
            output_hidden_states=True,
        )


def test_generate_through_the_graph_step(
    model: torch.nn.Module, graph_path_on_the_cpu: Callable[[], list[object]]
) -> None:
    """transformers' generate with our loop on the decode path of a CUDA machine, run eagerly: its tokens."""
    ids = torch.randint(0, 200, (1, 27), generator=torch.Generator().manual_seed(8))
    reference = BoundedCache(model)
    expected = _generate(model, ids, reference, max_new_tokens=24, do_sample=False)
    made = graph_path_on_the_cpu()
    cache = BoundedCache(model)
    ours = _generate(model, ids, cache, max_new_tokens=24, do_sample=False, custom_generate=bounded_decoding)
    assert torch.equal(ours, expected)
    assert shared_decoder_pool(model)._idle and len(made) <= 1  # a decoder served it (made here, or by a test before)
    # the step launched ahead of the stop was taken back: the state is the forward's, token for token
    _assert_same_states(cache, reference)


def test_bounded_generate_stops_at_the_end_token_through_the_graph_step(
    model: torch.nn.Module, graph_path_on_the_cpu: Callable[[], list[object]]
) -> None:
    ids = torch.randint(0, 200, (1, 27), generator=torch.Generator().manual_seed(12))
    free = bounded_generate(model, ids, 8)
    eos = int(free[0, 27 + 2])  # the third new token
    reference = BoundedCache(model)
    expected = bounded_generate(model, ids, 8, cache=reference, eos_token_id=eos)
    graph_path_on_the_cpu()
    cache = BoundedCache(model)
    assert torch.equal(bounded_generate(model, ids, 8, cache=cache, eos_token_id=eos), expected)
    _assert_same_states(cache, reference)


def _assert_same_states(ours: BoundedCache, reference: BoundedCache) -> None:
    for mine, theirs in zip(ours.states, reference.states, strict=True):
        assert mine is not None and theirs is not None and mine.pos == theirs.pos
        for name, tensor in theirs.tensors().items():
            if tensor.is_floating_point():
                torch.testing.assert_close(getattr(mine, name), tensor, atol=2e-4, rtol=2e-4)
            else:
                assert torch.equal(getattr(mine, name), tensor), name


def test_generate_calls_share_the_models_decoders(graph_path_on_the_cpu: Callable[[], list[object]]) -> None:
    """Graphs are captured once per model and batch size, not once per generate() call; the pool goes with the
    model."""
    import gc
    import weakref

    model = convert(tiny_llama(seed=9)[0], CONFIG).eval()
    made = graph_path_on_the_cpu()
    ids = torch.randint(0, 200, (1, 20), generator=torch.Generator().manual_seed(10))
    first = _generate(model, ids, BoundedCache(model), max_new_tokens=6, custom_generate=bounded_decoding)
    again = _generate(model, ids, BoundedCache(model), max_new_tokens=6, custom_generate=bounded_decoding)
    assert torch.equal(first, again) and len(made) == 1
    assert shared_decoder_pool(model)._idle == made
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the pool held its model weakly


@pytest.mark.gpu
def test_generate_with_our_loop_on_cuda_captures_once_and_gives_the_forwards_tokens() -> None:
    """On CUDA: generate(custom_generate=bounded_decoding) decodes through captured graphs (float32, greedy,
    sharpened logits so rounding cannot flip a token) and gives transformers' own loop's tokens; a second call
    reuses the captured decoder; a model on another GPU than the current one is captured on its own device."""
    from coda_gqa_l.models.graph_decode import graph_decode_supported

    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices[:1] + devices[1:2]:  # the current GPU, and a second one where there is one
        model = convert(tiny_llama(seed=5)[0], CONFIG).to(device).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)
        assert graph_decode_supported(model)
        ids = torch.randint(0, 200, (2, 50), generator=torch.Generator().manual_seed(12)).to(device)
        expected = _generate(model, ids, BoundedCache(model), max_new_tokens=40, do_sample=False)
        first = _generate(model, ids, BoundedCache(model), max_new_tokens=40, custom_generate=bounded_decoding)
        second = _generate(model, ids, BoundedCache(model), max_new_tokens=40, custom_generate=bounded_decoding)
        assert torch.equal(first, expected) and torch.equal(second, expected), device
        pool = shared_decoder_pool(model)
        # one graph per kind of one-token step: a plain step, the step that refreshes the segment's extras, the route
        assert len(pool._idle) == 1 and not pool.capture_failed
        assert set(pool._idle[0]._graphs) == {(1, "step"), (1, "refresh"), (1, "route")}


def test_a_step_launched_ahead_is_taken_back_and_the_switch_turns_it_off(model: torch.nn.Module) -> None:
    """``DecodeSteps.ahead`` makes an undoable decoder step and ``take_back`` undoes it; inside
    ``dispatch.steps_ahead(False)`` the step waits until its logits are asked for, and a step taken back never runs."""
    from coda_gqa_l.models.generation import DecodeSteps

    calls: list[object] = []

    class RecordingDecoder:
        capture = False

        def __call__(self, tokens: torch.Tensor, *, undoable: bool = False) -> torch.Tensor:
            calls.append(("step", int(tokens[0]), undoable))
            return torch.zeros(1, 3)

        def undo(self) -> None:
            calls.append("undo")

    decoder = RecordingDecoder()
    steps = DecodeSteps(model, BoundedCache(model), decoder)  # type: ignore[arg-type]
    with dispatch.steps_ahead(True):
        steps.ahead(torch.tensor([1])).take_back()
        assert steps.ahead(torch.tensor([2])).logits.shape == (1, 3)
    with dispatch.steps_ahead(False):
        steps.ahead(torch.tensor([3])).take_back()
        assert steps.ahead(torch.tensor([4])).logits.shape == (1, 3)
    decoder.capture = True  # a captured decoder: steps ahead unless switched off (dispatch.DEFAULT_STEPS_AHEAD)
    steps.ahead(torch.tensor([5])).take_back()
    decoder.capture = False  # an eager one's step runs before the call returns: none launched ahead by default
    steps.ahead(torch.tensor([6])).take_back()
    assert calls == [("step", 1, True), "undo", ("step", 2, True), ("step", 4, False), ("step", 5, True), "undo"]


def test_a_step_ahead_whose_capture_fails_is_left_to_the_forward(model: torch.nn.Module) -> None:
    """The decoder fails to capture the step launched ahead (the state untouched): a warning, no graph from then on,
    and the step waits for its logits to be asked for (through the forward); taken back, it never ran."""
    from coda_gqa_l.models.generation import DecodeSteps
    from coda_gqa_l.models.graph_decode import GraphCaptureError

    class FailingDecoder:
        capture = True

        def __call__(self, tokens: torch.Tensor, *, undoable: bool = False) -> torch.Tensor:
            raise GraphCaptureError("capturing the step failed: a test")

    cache = BoundedCache(model)
    with torch.no_grad():
        model(torch.randint(0, 200, (1, 5)), **cache_kwargs(cache), use_cache=True)
    steps = DecodeSteps(model, cache, FailingDecoder())  # type: ignore[arg-type]
    with (
        dispatch.steps_ahead(True),
        pytest.warns(UserWarning, match="a test; answers decode through the model's forward"),
    ):
        step = steps.ahead(torch.tensor([3]))
    assert steps.decoder is None
    step.take_back()
    assert cache.get_seq_length() == 5  # nothing ran
    assert steps.ahead(torch.tensor([3])).logits.shape == (1, model.config.vocab_size)
    assert cache.get_seq_length() == 6
