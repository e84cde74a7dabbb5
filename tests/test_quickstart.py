"""The seed's quick start runs unchanged, and the public package's keyword names work."""

from __future__ import annotations

import torch

from coda_gqa_l import CoDAGQALandmarkPerf2, CoDAGQALandmarkStatePerf2


def test_seed_quick_start_runs_as_written() -> None:
    attn = CoDAGQALandmarkPerf2(
        embed_dim=512, num_heads=8, num_kv_heads=2, window=256, num_landmarks_exact=64, num_landmarks_summary=64
    )
    state = attn.init_state(1, torch.device("cpu"), torch.float32)
    before = attn.cache_bytes(1, torch.float32)
    prompt = torch.randn(1, 2048, 512)
    with torch.no_grad():
        y, state = attn.prefill_chunked(prompt, state, block_size=256)
        for _ in range(1000):
            y_t, state = attn.step(torch.randn(1, 1, 512), state)
    assert isinstance(state, CoDAGQALandmarkStatePerf2)
    assert y.shape == (1, 2048, 512) and y_t.shape == (1, 1, 512)
    assert state.pos == 3048
    assert attn.cache_bytes(1, torch.float32) == before == state.nbytes()
    assert attn.cache_bytes(batch_size=1, dtype=torch.float32) == before


def test_public_keyword_names_are_accepted() -> None:
    attn = CoDAGQALandmarkPerf2(
        embed_dim=64,
        num_heads=4,
        num_kv_heads=2,
        window=32,
        num_landmarks_exact=8,
        num_landmarks_summary=8,
        rope_base=500000.0,
        lambda_init_bias=-5.0,
        theta_init=0.25,
        head_norm_mode="rmsnorm",
    )
    assert torch.allclose(attn.core.lambda_proj.bias, torch.full((4,), -5.0))
    assert torch.allclose(attn.core.theta, torch.full_like(attn.core.theta, 0.25))
    assert attn.core.rope.base == 500000.0
    state = attn.init_state(batch_size=1, device="cpu", dtype=torch.float32)
    x = torch.randn(1, 100, 64)
    with torch.no_grad():
        y, same = attn.prefill_chunked(x, state, block_size=16, write_cache=False)
        assert state.pos == 0 and same.pos == 100  # write_cache=False leaves the state alone
        none, state = attn.prefill_chunked(x, state, block_size=16, return_outputs=False)
    assert none is None and state.pos == 100
    identity = CoDAGQALandmarkPerf2(64, 4, 2, 32, 8, 8, head_norm_mode="none")
    assert isinstance(identity.core.head_norm, torch.nn.Identity)
