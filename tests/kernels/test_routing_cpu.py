"""The CPU inference routing (kernels/routing_cpu.py) gives the plain reference's outputs and states, bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import CONFIGS, SEQ_LEN, SHAPES, make_layer, token_like

import coda_gqa_l.attention as attention_module
from coda_gqa_l.kernels.dispatch import plain_reference
from coda_gqa_l.kernels.routing_cpu import route_chunk_inference
from coda_gqa_l.kernels.routing_reference import observe_exact_routing, route_chunk
from coda_gqa_l.state import BANK_FIELDS, TENSOR_FIELDS, Banks

# a stream start, a chunk ending mid-segment, one token, a chunk starting mid-segment, a long chunk
CHUNKS = (40, 13, 1, 90, 64, 200)


def _read(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    state = layer.init_state(x.shape[0])
    outputs = []
    start = 0
    for size in CHUNKS:
        y, state = layer.prefill_chunked(x[:, start : start + size], state, block_size=size)
        outputs.append(y)
        start += size
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_layer_reads_the_same_bits_as_the_plain_reference(
    shape: str, config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = make_layer(shape, config, seed=3).eval()
    layer.collect_metrics = False
    x = token_like(2, sum(CHUNKS), layer.embed_dim, seed=11)
    assert sum(CHUNKS) >= SEQ_LEN

    calls = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["start"])
        return route_chunk_inference(*args, **kwargs)

    monkeypatch.setattr(attention_module, "route_chunk_inference", counted)
    # the routing is what this compares: both runs attend through the per-segment reference (the banded attention,
    # equal to float rounding, has its own test: tests/test_banded_attention.py)
    monkeypatch.setattr(attention_module, "inference_attention", lambda device: False)
    with torch.no_grad():
        with plain_reference():
            expected, expected_state = _read(layer, x)
        assert not calls, "plain_reference() must run the reference routing"
        got, state = _read(layer, x)
    assert calls, "the inference routing did not run"
    assert torch.equal(got, expected)
    for name in TENSOR_FIELDS:
        assert torch.equal(getattr(state, name), getattr(expected_state, name)), name


def _random_chunk(seed: int, n: int, window: int, heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(12, dim, generator=gen)
    pick = torch.randint(0, 12, (2, heads, window + n), generator=gen)
    ext_k = torch.randn(2, heads, window + n, dim, generator=gen)
    ext_v = table[pick] + 0.05 * torch.randn(2, heads, window + n, dim, generator=gen)
    ext_g = torch.rand(2, heads, window + n, generator=gen)
    return ext_k, ext_v, ext_g


def test_a_long_stream_routed_chunk_by_chunk_matches_the_reference_at_every_step() -> None:
    """Bank by bank: seeding, exact hits, inserts and LRU overwrites all happen (a small vocabulary of values)."""
    layer = make_layer("gqa", "sinks-banks", seed=5)
    config, eta = layer.config, layer.eta.detach()
    ref_banks = got_banks = _empty_banks(layer)
    start = 0
    for step, n in enumerate((5, 64, 27, 100, 64, 3, 150)):
        ext = _random_chunk(step, n, window=config.window, heads=layer.num_kv_heads, dim=layer.head_dim)
        ref_banks, *ref_view = route_chunk(ref_banks, *ext, start=start, n=n, eta=eta, config=config)
        got_banks, *got_view = route_chunk_inference(got_banks, *ext, start=start, n=n, eta=eta, config=config)
        for a, b in zip((*ref_banks, *ref_view), (*got_banks, *got_view), strict=True):
            assert a.shape == b.shape and torch.equal(a, b), f"chunk {step}"
        start += n
    assert bool(ref_banks.ex_filled.all()) and bool(ref_banks.sm_filled.all())
    # the state owns its tensors: no view into the snapshots handed to the attention
    for name in ("sm_k", "sm_v", "sm_g"):
        assert getattr(got_banks, name).is_contiguous()
        assert getattr(got_banks, name).untyped_storage().data_ptr() != got_view[0].untyped_storage().data_ptr()


def test_an_observed_routing_runs_the_reference_and_reports_every_segment() -> None:
    layer = make_layer("gqa", "full", seed=5)
    config, eta = layer.config, layer.eta.detach()
    ext = _random_chunk(1, 256, window=config.window, heads=layer.num_kv_heads, dim=layer.head_dim)
    with torch.no_grad():
        ext[2][:, :, :100] = 0.0  # gates below tau_exact: segments the inference path would skip
    reference: list[Any] = []
    with observe_exact_routing(reference.append):
        route_chunk(_empty_banks(layer), *ext, start=0, n=256, eta=eta, config=config)
    seen: list[Any] = []
    with observe_exact_routing(seen.append):
        route_chunk_inference(_empty_banks(layer), *ext, start=0, n=256, eta=eta, config=config)
    assert len(seen) == len(reference) > 0


def _empty_banks(layer: Any) -> Banks:
    state = layer.init_state(2)
    return Banks(*(getattr(state, name) for name in BANK_FIELDS))


def test_ties_between_prototypes_go_to_the_lower_slot_as_in_the_reference() -> None:
    layer = make_layer("gqa", "summary-only", seed=2)
    config, eta = layer.config, layer.eta.detach()
    banks = _empty_banks(layer)
    ext = _random_chunk(4, 256, window=config.window, heads=layer.num_kv_heads, dim=layer.head_dim)
    banks, *_ = route_chunk(banks, *ext, start=0, n=256, eta=eta, config=config)
    assert bool(banks.sm_filled.all())
    sm_v = banks.sm_v.clone()
    sm_v[:, :, 1::2] = sm_v[:, :, 0::2]  # every odd prototype a copy of the even one below it: exact cosine ties
    banks = banks._replace(sm_v=sm_v)
    ext = _random_chunk(5, 128, window=config.window, heads=layer.num_kv_heads, dim=layer.head_dim)
    ref = route_chunk(banks, *ext, start=256, n=128, eta=eta, config=config)
    got = route_chunk_inference(banks, *ext, start=256, n=128, eta=eta, config=config)
    for a, b in zip((*ref[0], *ref[1:]), (*got[0], *got[1:]), strict=True):
        assert torch.equal(a, b)


def test_the_reference_reads_the_summary_fill_back_only_until_every_prototype_is_seeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seeding asks the device how many rounds to run (a synchronisation on a GPU, where the reference routes when
    training): once no prototype is left empty, the rest of the chunk's segments ask nothing."""
    layer = make_layer("gqa", "full", seed=5)
    config, eta = layer.config, layer.eta.detach()
    ext = _random_chunk(3, 320, window=config.window, heads=layer.num_kv_heads, dim=layer.head_dim)
    reads: list[int] = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or real(t))
    banks, *_ = route_chunk(_empty_banks(layer), *ext, start=0, n=320, eta=eta, config=config)
    routed = len([b for b in range(0, 320, config.segment) if b - config.window + config.segment > 0])
    assert bool(banks.sm_filled.all())
    assert 1 <= len(reads) < routed, (len(reads), routed)
