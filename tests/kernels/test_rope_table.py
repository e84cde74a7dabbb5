"""A RoPE table in one kernel (kernels/rope_table.py) against ``RotaryEmbedding.cos_sin``, the module's own
computation, and the step tables that use it."""

from __future__ import annotations

import pytest
import torch

from coda_gqa_l import step_tables
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.kernels.rope_table import rope_cos_sin, rope_cos_sin_reference
from coda_gqa_l.primitives import RotaryEmbedding

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}


def _within_one_step(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """The same float64 arithmetic rounded to the tables' dtype: equal but for a rare tie (one step of the dtype)."""
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    step = torch.finfo(expected.dtype).eps * expected.abs().clamp_min(2**-10)
    assert bool(((ours - expected).abs() <= step).all())
    assert (ours != expected).float().mean() < 0.01


def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not dispatch.interpreting():
        pytest.skip("the CPU check runs Triton's interpreter")
    from coda_gqa_l.kernels import rope_table_triton

    assert "Interpreted" in type(rope_table_triton._rope_table_kernel).__name__  # the kernel itself runs
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
def test_tables_match_the_modules_cos_sin(monkeypatch: pytest.MonkeyPatch, layout: str, scaling: dict | None) -> None:
    _interpreter(monkeypatch)
    rope = RotaryEmbedding(64, 10000.0, layout, scaling, 8192 if scaling else None)  # type: ignore[arg-type]
    assert (rope.attention_scaling != 1.0) == (scaling is not None)  # yarn scales the tables
    positions = torch.tensor([[0, 1, 383, 4096], [65_535, 131_071, 1_000_003, 7]])
    cos, sin = rope_cos_sin(rope, positions)
    ref_cos, ref_sin = rope_cos_sin_reference(rope, positions)
    _within_one_step(cos, ref_cos)
    _within_one_step(sin, ref_sin)
    start = torch.tensor(131_000)
    cos, sin = rope_cos_sin(rope, None, start=start, count=5)
    ref_cos, ref_sin = rope.cos_sin(start + torch.arange(5))
    _within_one_step(cos, ref_cos)
    _within_one_step(sin, ref_sin)


def test_step_tables_share_one_table_from_a_device_start(monkeypatch: pytest.MonkeyPatch) -> None:
    _interpreter(monkeypatch)
    rope = RotaryEmbedding(32)
    pos = torch.tensor(77)
    with step_tables.step_tables():
        first = step_tables.cos_sin_range(rope, ("queries", id(pos), 1), pos, 1)
        again = step_tables.cos_sin_range(rope, ("queries", id(pos), 1), pos, 1)
        from_positions = step_tables.cos_sin(rope, ("queries", id(pos), 1), lambda: pos + torch.arange(1))
    assert first[0] is again[0] and from_positions[0] is first[0]  # one key, one table
    _within_one_step(first[0], rope.cos_sin(torch.tensor([77]))[0])
    cos, _ = step_tables.cos_sin_range(rope, "host start", 77, 1)  # a host start: positions built, same table
    _within_one_step(cos, first[0])


def test_bad_arguments_are_named() -> None:
    rope = RotaryEmbedding(32)
    with pytest.raises(ValueError, match="give the positions, or a start and a count"):
        rope_cos_sin(rope)
    with pytest.raises(ValueError, match="start must be a 0-d integer tensor"):
        rope_cos_sin(rope, None, start=torch.tensor([3]), count=2)
    with pytest.raises(ValueError, match="count positive"):
        rope_cos_sin(rope, None, start=torch.tensor(3), count=0)
    with pytest.raises(ValueError, match="positions must be integers"):
        rope_cos_sin(rope, torch.tensor([1.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_tables_match_the_modules_cos_sin_on_the_gpu(layout: str) -> None:
    rope = RotaryEmbedding(128, 500000.0, layout, YARN, 8192).cuda()  # type: ignore[arg-type]
    positions = torch.randint(0, 1 << 20, (3, 41), device="cuda")
    cos, sin = rope_cos_sin(rope, positions)
    ref_cos, ref_sin = rope_cos_sin_reference(rope, positions)
    _within_one_step(cos, ref_cos)
    _within_one_step(sin, ref_sin)
    # other dtypes: the module's own tables
    assert torch.equal(rope_cos_sin(rope, positions, torch.bfloat16)[0], rope.cos_sin(positions, torch.bfloat16)[0])
