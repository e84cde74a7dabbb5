"""``CapturedDecoder``: its steps equal ``layer.step``: replayed from CUDA graphs on a GPU, and eagerly
(``capture=False``, the Triton kernels in the interpreter) on the CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import token_like

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig
from coda_gqa_l.kernels import dispatch


def test_decoder_refuses_a_cpu_layer() -> None:
    from coda_gqa_l.decode import CapturedDecoder

    layer = BoundedCoDAAttention(32, 4, 2, config=BoundedConfig(window=16, num_landmarks_exact=4))
    with pytest.raises(ValueError, match="CUDA"):
        CapturedDecoder(layer, layer.init_state(1))


@pytest.mark.parametrize(
    ("sinks", "position_mode", "prompt", "end"),
    [(3, "relative", 2, 50), (0, "absolute", 37, 70)],  # sinks written by steps; bank routings at 40, 48, 56, 64
)
def test_eager_decoder_steps_equal_the_layers_steps(
    monkeypatch: pytest.MonkeyPatch, sinks: int, position_mode: str, prompt: int, end: int
) -> None:
    """A prompt, then steps one by one to ``end``: segments of 8 start at 8, 16, ... (routing steps; from 40 the
    tokens leaving the 32-slot window go to the banks), the step after each computes and keeps the segment's
    extras, the others read them."""
    assert dispatch.interpreting() or torch.cuda.is_available()
    from coda_gqa_l.decode import CapturedDecoder

    torch.manual_seed(0)
    config = BoundedConfig(
        window=32, num_landmarks_exact=6, num_landmarks_summary=4, num_sink=sinks, position_mode=position_mode
    )
    layer = BoundedCoDAAttention(64, 4, 2, config=config)
    with torch.no_grad():
        layer.gate_proj.weight.mul_(4.0)  # gates that open: the exact bank takes tokens
    x = token_like(2, end, 64, seed=3)
    with torch.no_grad():
        _, state = layer.prefill_chunked(x[:, :prompt], layer.init_state(2), block_size=8)
        eager_state = state.clone()
        eager = torch.cat([layer.step(x[:, t : t + 1], eager_state)[0] for t in range(prompt, end)], 1)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")  # the decoder's kernels, in the interpreter on the CPU
    decoder = CapturedDecoder(layer, state, capture=False)
    ours = torch.cat([decoder(x[:, t : t + 1]) for t in range(prompt, end)], 1)
    torch.testing.assert_close(ours, eager, atol=2e-4, rtol=2e-4)
    assert decoder.state.pos == eager_state.pos == end
    assert bool(decoder.state.ex_filled.any())
    for name in ("win_k", "win_v", "ex_k", "ex_v", "ex_filled", "sm_v", "sm_filled", "sink_k", "position"):
        a, b = getattr(decoder.state, name), getattr(eager_state, name)
        if a.dtype in (torch.bool, torch.int64):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
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
    assert set(decoder._graphs) == {"route", "refresh", "step"}


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
