"""A GPU prefill that routes each chunk ahead on a side stream (``routing_ahead.py``) gives the outputs and state of
one that routes and attends each chunk in turn, bit for bit: the same kernels on the same inputs, launched in
another order across two streams."""

from __future__ import annotations

import pytest
import torch
from helpers import token_like

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.routing_ahead import RoutingAhead
from coda_gqa_l.state import BoundedState

STATE_FIELDS = (
    "sink_k", "sink_v", "win_k", "win_v", "win_g", "ex_k", "ex_v", "ex_g", "ex_last", "ex_filled",
    "sm_k", "sm_v", "sm_g", "sm_filled", "position",
)  # fmt: skip


def _layer(dtype: torch.dtype, sinks: int) -> BoundedCoDAAttention:
    torch.manual_seed(0)
    config = BoundedConfig(window=64, num_landmarks_exact=12, num_landmarks_summary=8, num_sink=sinks, max_inserts=4)
    layer = BoundedCoDAAttention(128, 8, 2, config=config).cuda().to(dtype)
    with torch.no_grad():
        layer.gate_proj.weight.mul_(4.0)  # gates spread over (0, 1): inserts, hits and EMA moves all happen
    return layer


def _prefill(layer: BoundedCoDAAttention, x: torch.Tensor, state: BoundedState, block: int, ahead: bool):
    with torch.inference_mode(), dispatch.routing_ahead(ahead):
        return layer.prefill_chunked(x, state, block_size=block)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("block", [96, 101])  # whole segments, and chunks that start mid-segment
def test_routing_ahead_gives_the_outputs_and_state_of_routing_in_turn(
    dtype: torch.dtype, sinks: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = _layer(dtype, sinks)
    x = token_like(2, 900, 128, seed=3).cuda().to(dtype)
    launched = []
    route = RoutingAhead.route

    def counted(self: RoutingAhead, *args: object, **kwargs: object) -> object:
        launched.append(self.stream)
        return route(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RoutingAhead, "route", counted)
    with torch.inference_mode():
        _, warm = layer.prefill_chunked(x[:, :40], layer.init_state(2), block_size=64)  # a state with a history
    handed = warm.clone()
    in_turn_y, in_turn = _prefill(layer, x[:, 40:], warm.clone(), block, ahead=False)
    assert not launched
    ahead_y, ahead = _prefill(layer, x[:, 40:], handed, block, ahead=True)
    assert len(launched) == -(-860 // block) and launched[0] is not torch.cuda.current_stream()
    assert torch.equal(ahead_y, in_turn_y)
    assert ahead is handed and ahead.pos == in_turn.pos == 900
    for name in STATE_FIELDS:
        assert torch.equal(getattr(ahead, name), getattr(in_turn, name)), name
    assert ahead.ex_filled.any() and ahead.sm_filled.any()


@pytest.mark.gpu
def test_routing_ahead_writes_no_tensor_the_caller_handed_in() -> None:
    layer = _layer(torch.bfloat16, 3)
    x = token_like(1, 700, 128, seed=4).cuda().to(torch.bfloat16)
    with torch.inference_mode():
        _, state = layer.prefill_chunked(x[:, :300], layer.init_state(1), block_size=128)
        banks_before = [getattr(state, name).clone() for name in ("ex_k", "ex_v", "sm_k", "sm_v", "ex_last")]
        held = [getattr(state, name) for name in ("ex_k", "ex_v", "sm_k", "sm_v", "ex_last")]
        kept = state.clone()
        _, advanced = layer.prefill_chunked(x[:, 300:], state, block_size=128, write_cache=False)
    assert advanced is not state and advanced.pos == 700 and state.pos == 300
    for before, tensor in zip(banks_before, held, strict=True):
        assert torch.equal(before, tensor)  # the banks a caller held are not routed in place
    for name in STATE_FIELDS:
        assert torch.equal(getattr(state, name), getattr(kept, name)), name
    with torch.inference_mode():
        _, written = layer.prefill_chunked(x[:, 300:], state, block_size=128)
    assert written is state and state.pos == 700 and not torch.equal(state.ex_v, banks_before[1])
    for before, tensor in zip(banks_before, held, strict=True):
        assert torch.equal(before, tensor)
