"""The reference path's decode step on a per-segment key block (decode_view.py) gives the plain
reference's outputs and states to the last bit, across segment boundaries and routing, and
rebuilds its block whenever the state changed some other way."""

from __future__ import annotations

import pytest
import torch
from helpers import make_layer, routing_events_missing, token_like

from coda_gqa_l.decode_view import DecodeView
from coda_gqa_l.kernels.dispatch import plain_reference
from coda_gqa_l.state import TENSOR_FIELDS

LENGTH = 160


def _run(layer, x, prefix: int, *, plain: bool, poke_at: int | None = None, inference: bool = False):
    """Prefill ``prefix`` tokens, then step the rest one by one; returns outputs and final state.
    ``poke_at``: before that step, change an exact-bank value in place and prefill 3 tokens."""
    outputs = []
    with torch.inference_mode() if inference else torch.no_grad():
        state = layer.init_state(x.shape[0])
        y, state = layer.prefill_chunked(x[:, :prefix], state, block_size=16)
        outputs.append(y)
        t = prefix
        while t < x.shape[1]:
            if poke_at is not None and t == poke_at:
                state.ex_v.mul_(1.5)  # an in-place write the view must notice
                y, state = layer.prefill_chunked(x[:, t : t + 3], state, block_size=3)
                outputs.append(y)
                t += 3
                continue
            if plain:
                with plain_reference():
                    y, state = layer.step(x[:, t : t + 1], state)
            else:
                y, state = layer.step(x[:, t : t + 1], state)
            outputs.append(y)
            t += 1
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize(
    "shape, config, prefix, inference",  # inference_mode: the neural database's path
    [
        ("gqa", "sinks-banks", 5, False),
        ("mqa-dh-not-d-over-h", "full", 37, True),
        ("mha-odd-heads", "plain-gqa", 37, True),
    ],
)
def test_steps_on_the_view_equal_the_plain_reference(shape: str, config: str, prefix: int, inference: bool) -> None:
    layer = make_layer(shape, config, seed=3).eval()
    x = token_like(2, LENGTH, layer.embed_dim, seed=4)
    _, counted = _run(layer, x, prefix, plain=True)  # collect_metrics: every routing event happened
    assert not routing_events_missing(layer, counted.metrics)
    layer.collect_metrics = False  # counting routing needs the plain path
    fast_y, fast = _run(layer, x, prefix, plain=False, inference=inference)
    plain_y, plain = _run(layer, x, prefix, plain=True, inference=inference)
    assert isinstance(fast.decode_view, DecodeView) and plain.decode_view is None  # the view really ran
    assert torch.equal(fast_y, plain_y)
    for name in TENSOR_FIELDS:
        assert torch.equal(getattr(fast, name), getattr(plain, name)), name
    assert fast.pos == plain.pos == LENGTH


def test_a_state_changed_elsewhere_rebuilds_the_view() -> None:
    """A prefill between steps and an in-place write to a bank: the next step sees the new state."""
    layer = make_layer("gqa", "full", seed=5).eval()
    layer.collect_metrics = False
    x = token_like(1, LENGTH, layer.embed_dim, seed=6)
    fast_y, _ = _run(layer, x, 40, plain=False, poke_at=101)
    plain_y, _ = _run(layer, x, 40, plain=True, poke_at=101)
    assert torch.equal(fast_y, plain_y)


def test_a_clone_steps_on_its_own_view() -> None:
    layer = make_layer("gqa", "full", seed=7).eval()
    layer.collect_metrics = False
    x = token_like(1, 120, layer.embed_dim, seed=8)
    state = layer.init_state(1)
    with torch.no_grad():
        _, state = layer.prefill_chunked(x[:, :50], state)
        layer.step(x[:, 50:51], state)
        fork = state.clone()
        assert fork.decode_view is None
        a, _ = layer.step(x[:, 51:52], state)
        b, _ = layer.step(x[:, 51:52], fork)
        c, _ = layer.step(x[:, 52:53], state)  # the original's view is not disturbed by the fork
        with plain_reference():
            d, _ = layer.step(x[:, 52:53], fork)
    assert torch.equal(a, b) and torch.equal(c, d)
