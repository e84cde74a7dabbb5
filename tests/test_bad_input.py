"""Bad input gets an exception whose message names the problem (docs/semantics.md section 2, issue 3 item 7)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_layer

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig


@pytest.fixture()
def layer():
    return make_layer("gqa", "full")


@pytest.mark.parametrize(
    "make_x,error,message",
    [
        (lambda: torch.randn(10, 64), ValueError, "shape"),
        (lambda: torch.randn(1, 10, 63), ValueError, "width 63"),
        (lambda: torch.randn(1, 0, 64), ValueError, "length 0"),
        (lambda: torch.randn(1, 10, 64, dtype=torch.float64), TypeError, "dtype torch.float64"),
        (lambda: torch.full((1, 10, 64), float("nan")), ValueError, "NaN"),
        (lambda: [[0.0] * 64], TypeError, "torch.Tensor"),
    ],
)
def test_bad_x(layer, make_x, error, message: str) -> None:
    with pytest.raises(error, match=message):
        layer.prefill_chunked(make_x(), layer.init_state(1))
    with pytest.raises(error, match=message):
        layer(make_x())


def test_bad_state(layer) -> None:
    x = torch.randn(2, 10, 64)
    with pytest.raises(ValueError, match="batch size 3"):
        layer.prefill_chunked(x, layer.init_state(3))
    with pytest.raises(TypeError, match="torch.bfloat16"):
        layer.prefill_chunked(x, layer.init_state(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="on meta"):
        layer.prefill_chunked(x, layer.init_state(2, device="meta"))
    other = make_layer("gqa", "sinks-banks")
    with pytest.raises(ValueError, match="another config.*num_sink"):
        layer.prefill_chunked(x, other.init_state(2))
    narrow = BoundedCoDAAttention(64, 4, 1, config=layer.config)
    with pytest.raises(ValueError, match="1 KV heads"):
        layer.prefill_chunked(x, narrow.init_state(2))
    with pytest.raises(TypeError, match="BoundedState"):
        layer.prefill_chunked(x, {"pos": 0})


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True])
def test_bad_block_size(layer, block_size) -> None:
    with pytest.raises(ValueError, match="block_size"):
        layer.prefill_chunked(torch.randn(1, 10, 64), layer.init_state(1), block_size=block_size)


def test_step_takes_one_token(layer) -> None:
    with pytest.raises(ValueError, match="one token"):
        layer.step(torch.randn(1, 3, 64), layer.init_state(1))


def test_failed_call_leaves_state_untouched(layer) -> None:
    state = layer.init_state(1)
    with torch.no_grad():
        layer.prefill_chunked(torch.randn(1, 40, 64), state)
    before = state.clone()
    with pytest.raises(ValueError):
        layer.prefill_chunked(torch.full((1, 10, 64), float("nan")), state)
    assert state.pos == before.pos
    for name, tensor in before.tensors().items():
        assert torch.equal(getattr(state, name), tensor)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(window=100, segment=16), "multiple of segment"),
        (dict(window=64, segment=32), "at most window / 4"),
        (dict(window=32, num_sink=32), "num_sink"),
        (dict(novelty=0.95, match=0.9), "novelty <= match"),
        (dict(window=0), "window"),
        (dict(num_landmarks_exact=-1), "num_landmarks_exact"),
        (dict(position_mode="rotary"), "position_mode"),
        (dict(tau_exact=1.5), "tau_exact"),
    ],
)
def test_config_validation(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BoundedConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        BoundedCoDAAttention(64, 4, 2, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((64, 4, 3), {}, "multiple of num_kv_heads"),
        ((60, 8, 2), {}, "pass head_dim"),
        ((64, 4, 2), dict(head_dim=15), "even"),
        ((64, 4, 2), dict(head_norm="layer"), "head_norm"),
        ((64, 4, 2), dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic NTK"),
    ],
)
def test_module_validation(args, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BoundedCoDAAttention(*args, window=32, num_landmarks_exact=4, num_landmarks_summary=4, **kwargs)


def test_presets_keep_the_storage_budget() -> None:
    medium = BoundedConfig.preset("medium", num_sink=4)
    assert (medium.num_sink, medium.window, medium.num_landmarks_exact, medium.num_landmarks_summary) == (
        4,
        256,
        60,
        64,
    )
    assert medium.storage_slots == 384 == BoundedConfig.preset("medium").storage_slots
    assert medium.visible_slots == (4 + 60 + 64 + 256 - 64 + 1, 384)
    assert BoundedConfig.preset("tiny").storage_slots == 192
    assert BoundedConfig.preset("large").storage_slots == 768
    with pytest.raises(ValueError, match="unknown preset"):
        BoundedConfig.preset("huge")
    with pytest.raises(TypeError, match="not both"):
        BoundedCoDAAttention(64, 4, 2, window=64, config=medium)
    # one way to build the layer: config=, or the seed's names and any other BoundedConfig field as keywords
    layer = BoundedCoDAAttention(64, 4, 2, window=64, num_landmarks_exact=16, num_landmarks_summary=16, num_sink=2)
    assert layer.config == BoundedConfig(window=64, num_landmarks_exact=16, num_landmarks_summary=16, num_sink=2)
    with pytest.raises(TypeError, match=r"\['tau_exactt'\]: neither layer options nor BoundedConfig fields"):
        BoundedCoDAAttention(64, 4, 2, tau_exactt=0.5)
