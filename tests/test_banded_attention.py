"""The banded inference attention (banded_attention.py) gives the reference's outputs
(segment_attention.attend_segments) to float32 rounding, on fresh random inputs, for every chunk alignment, small and
large segments, sinks, empty and partly empty banks and both position modes; the layer uses it for inference only."""

from __future__ import annotations

import pytest
import torch
from helpers import make_layer, token_like

import coda_gqa_l.attention as attention_module
from coda_gqa_l.banded_attention import attend_banded
from coda_gqa_l.config import BoundedConfig
from coda_gqa_l.kernels.dispatch import plain_reference
from coda_gqa_l.primitives import RotaryEmbedding
from coda_gqa_l.segment_attention import attend_segments

CASES = [  # window, segment, sinks, bank slots, position mode
    (32, 8, 2, 5, "relative"),
    (32, 4, 3, 0, "relative"),  # a baseline's shape: no banks, small segments
    (64, 16, 0, 7, "absolute"),
    (380, 4, 4, 0, "relative"),  # StreamingLLM 4 + 380 as coda-eval builds it
    (256, 64, 4, 9, "relative"),  # the shipped file's window and segment
]
SPANS = [(0, 1), (0, 37), (5, 70), (40, 3), (123, 200), (1000, 512)]  # chunk start, chunk length


@pytest.mark.parametrize("case", CASES, ids=lambda c: "W{}-S{}-Ns{}-M{}-{}".format(*c))
def test_banded_equals_the_reference(case: tuple[int, int, int, int, str]) -> None:
    window, segment, sinks, slots, mode = case
    config = BoundedConfig(
        window=window,
        segment=segment,
        num_sink=sinks,
        num_landmarks_exact=slots,
        num_landmarks_summary=0,
        position_mode=mode,  # type: ignore[arg-type]
    )
    rope = RotaryEmbedding(16, base=10000.0)
    gen = torch.Generator().manual_seed(window * 31 + segment)
    batch, kv_heads, streams, dim = 2, 3, 4, 16
    for start, n in SPANS:
        nseg = (start + n - 1) // segment - start // segment + 1

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen)

        bank_bias = rand(batch, kv_heads, nseg, slots).clamp(max=0.0)
        if slots:
            bank_bias[..., -1] = float("-inf")  # an empty slot
        args = (
            rand(batch, kv_heads, streams, n, dim),
            rand(batch, kv_heads, window + n, dim),
            rand(batch, kv_heads, window + n, dim),
            rand(batch, kv_heads, sinks, dim),
            rand(batch, kv_heads, sinks, dim),
            rand(batch, kv_heads, nseg, slots, dim),
            rand(batch, kv_heads, nseg, slots, dim),
            bank_bias,
        )
        kwargs = dict(start=start, config=config, rope=rope, scale=0.25)
        expected = attend_segments(*args, **kwargs)  # type: ignore[arg-type]
        got = attend_banded(*args, **kwargs)  # type: ignore[arg-type]
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"start {start}, {n} tokens")


def test_the_layer_uses_it_for_inference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of more than one segment without gradients go banded; the outputs and states match the plain
    reference's; with gradients (training) the reference runs."""
    calls: list[int] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0].shape[3])
        return attend_banded(*args, **kwargs)

    monkeypatch.setattr(attention_module, "attend_banded", counted)
    layer = make_layer("gqa", "sinks-banks", seed=2).eval()
    x = token_like(2, 200, layer.embed_dim, seed=5)
    with torch.inference_mode():
        banded_y, banded = layer.prefill_chunked(x, layer.init_state(2), block_size=64)
        with plain_reference():
            plain_y, plain = layer.prefill_chunked(x, layer.init_state(2), block_size=64)
    assert calls and all(n > layer.config.segment for n in calls)
    torch.testing.assert_close(banded_y, plain_y, atol=1e-5, rtol=1e-5)
    assert banded.ex_filled.any()  # the banks took tokens, so the bank snapshots were read
    for name, tensor in plain.tensors().items():
        got = getattr(banded, name)
        if tensor.is_floating_point():
            torch.testing.assert_close(got, tensor, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert torch.equal(got, tensor), name
    calls.clear()
    layer.train()
    y, _ = layer.prefill_chunked(x[:, :64], layer.init_state(2), block_size=64)
    y.sum().backward()  # gradients: the reference, which training and the tests compare against
    assert not calls
