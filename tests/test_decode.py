"""``CapturedDecoder``: graph-replayed steps equal ``layer.step`` (CUDA only)."""

from __future__ import annotations

import pytest
import torch
from helpers import token_like

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig


def test_decoder_refuses_a_cpu_layer() -> None:
    from coda_gqa_l.decode import CapturedDecoder

    layer = BoundedCoDAAttention(32, 4, 2, config=BoundedConfig(window=16, num_landmarks_exact=4))
    with pytest.raises(ValueError, match="CUDA"):
        CapturedDecoder(layer, layer.init_state(1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("position_mode", ["relative", "absolute"])
def test_captured_steps_equal_eager_steps(dtype: torch.dtype, sinks: int, position_mode: str) -> None:
    from coda_gqa_l.decode import CapturedDecoder

    torch.manual_seed(0)
    config = BoundedConfig(
        window=64, num_landmarks_exact=12, num_landmarks_summary=8, num_sink=sinks, position_mode=position_mode
    )
    layer = BoundedCoDAAttention(128, 8, 2, config=config).cuda().to(dtype)
    with torch.no_grad():
        layer.gate_proj.weight.mul_(4.0)
    x = token_like(2, 500, 128, seed=1).cuda().to(dtype)
    with torch.no_grad():
        _, state = layer.prefill_chunked(x[:, :37], layer.init_state(2), block_size=64)
        eager_state = state.clone()
        decoder = CapturedDecoder(layer, state)
        ours, eager = [], []
        for t in range(37, 500):
            ours.append(decoder(x[:, t : t + 1]))
            eager.append(layer.step(x[:, t : t + 1], eager_state)[0])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(torch.cat(ours, 1), torch.cat(eager, 1), **tol)
    assert decoder.state.pos == eager_state.pos == 500
    for name in ("win_k", "ex_k", "ex_last", "ex_filled", "sm_v", "sm_filled", "sink_k", "position"):
        a, b = getattr(decoder.state, name), getattr(eager_state, name)
        if a.dtype in (torch.bool, torch.int64):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)
    assert len(decoder._graphs) == 2


@pytest.mark.gpu
def test_decoder_continues_a_state_prefilled_under_inference_mode() -> None:
    from coda_gqa_l.decode import CapturedDecoder

    torch.manual_seed(0)
    layer = BoundedCoDAAttention(128, 8, 2, config=BoundedConfig(window=64, num_landmarks_exact=12)).cuda()
    x = token_like(1, 300, 128, seed=2).cuda()
    with torch.inference_mode():
        _, state = layer.prefill_chunked(x[:, :200], layer.init_state(1), block_size=64, return_outputs=False)
        eager_state = state.clone()
        eager = torch.cat([layer.step(x[:, t : t + 1], eager_state)[0] for t in range(200, 300)], 1)
    decoder = CapturedDecoder(layer, state)
    with torch.no_grad():
        ours = torch.cat([decoder(x[:, t : t + 1]) for t in range(200, 300)], 1)
    torch.testing.assert_close(ours, eager, atol=1e-4, rtol=1e-4)
    assert decoder.state.pos == 300
