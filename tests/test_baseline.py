"""Unbounded layers: KV-cache decoding equals a full pass, and the function-preserving init."""

from __future__ import annotations

import pytest
import torch

from coda_gqa_l import BaselineGQA, CoDAGQA


def _copy_projections(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(dst.core, name).load_state_dict(getattr(src.core, name).state_dict())


def _reference_gqa(layer: BaselineGQA, x: torch.Tensor) -> torch.Tensor:
    """Plain float64 attention written out, as a check of the SDPA path."""
    core = layer.core
    b, length, _ = x.shape
    q, k, v, _ = core.project(x)
    cos, sin = core.rope.cos_sin(torch.arange(length), x.dtype)
    from coda_gqa_l import apply_rope, repeat_kv

    q = apply_rope(q, cos, sin, core.rope.layout)
    k = repeat_kv(apply_rope(k, cos, sin, core.rope.layout), core.group)
    v = repeat_kv(v, core.group)
    scores = q @ k.transpose(-1, -2) * core.softmax_scale
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return core.o_proj(out.transpose(1, 2).reshape(b, length, -1))


def test_baseline_matches_written_out_attention() -> None:
    torch.manual_seed(0)
    layer = BaselineGQA(48, 6, 2, rope_base=100000.0).double()
    x = torch.randn(2, 37, 48, dtype=torch.float64)
    assert torch.allclose(layer(x), _reference_gqa(layer, x), atol=1e-10)


@pytest.mark.parametrize("cls", [BaselineGQA, CoDAGQA])
def test_cached_decoding_equals_one_pass(cls) -> None:
    torch.manual_seed(0)
    layer = cls(64, 4, 2, head_dim=24)
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2)
        parts = [layer(x[:, :17], cache)]
        parts += [layer(x[:, t : t + 1], cache) for t in range(17, 30)]
        parts.append(layer(x[:, 30:], cache))
    assert cache.pos == 40 and cache.nbytes() == 2 * 2 * 2 * 40 * 24 * 4
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_exact_identity_reproduces_plain_attention() -> None:
    torch.manual_seed(0)
    plain = BaselineGQA(64, 4, 2)
    coda = CoDAGQA(64, 4, 2, head_norm="identity", exact_identity=True)
    _copy_projections(plain, coda)
    x = torch.randn(2, 50, 64)
    assert (coda(x) - plain(x)).abs().max().item() < 1e-6
    # the scalar is a real parameter: training moves lambda away from 0
    (coda(x) * torch.randn(2, 50, 64)).sum().backward()
    assert coda.core.lambda_scale.grad.abs() > 0


def test_lambda_near_zero_is_close_to_plain_attention() -> None:
    torch.manual_seed(0)
    plain = BaselineGQA(64, 4, 2)
    coda = CoDAGQA(64, 4, 2, head_norm="identity")
    _copy_projections(plain, coda)
    x = torch.randn(2, 50, 64)
    rel = ((coda(x) - plain(x)).norm() / plain(x).norm()).item()
    assert 0 < rel < 0.01  # lambda = sigmoid(-6) = 0.0025 of a noise stream of similar size
