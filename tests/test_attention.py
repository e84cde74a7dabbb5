"""The invariants 1-5 of docs/semantics.md section 5 over a matrix of shapes and configs, with evictions happening."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CONFIGS,
    SEQ_LEN,
    SHAPES,
    make_layer,
    margin_safe_case,
    routing_events_missing,
    token_like,
    unbounded_twin,
)

from coda_gqa_l import BoundedCoDAAttention

STATE_FLOATS = ("sink_k", "sink_v", "win_k", "win_v", "win_g", "ex_k", "ex_v", "ex_g", "sm_k", "sm_v", "sm_g")
STATE_EXACT = ("ex_last", "ex_filled", "sm_filled", "position")
MATRIX = [(s, c) for s in SHAPES for c in CONFIGS]


def assert_states_close(a, b, atol: float = 1e-4) -> None:
    assert a.pos == b.pos
    for name in STATE_EXACT:
        assert torch.equal(getattr(a, name), getattr(b, name)), f"{name} differs: routing decisions diverged"
    for name in STATE_FLOATS:
        diff = (
            (getattr(a, name).float() - getattr(b, name).float()).abs().max().item()
            if getattr(a, name).numel()
            else 0.0
        )
        assert diff <= atol, f"{name} differs by {diff}"


def assert_routing_happened(layer: BoundedCoDAAttention, metrics: dict[str, float]) -> None:
    """An invariance test with empty banks proves nothing: every event must have occurred."""
    assert not routing_events_missing(layer, metrics)
    assert metrics["min_margin"] >= 1e-4


@pytest.mark.parametrize("shape,config", MATRIX)
def test_bounded_equals_unbounded_until_window_fills(shape: str, config: str) -> None:
    layer = make_layer(shape, config)
    twin = unbounded_twin(layer)
    x = torch.randn(2, layer.config.window, layer.core.embed_dim)
    with torch.no_grad():
        bounded, state = layer.prefill_chunked(x, layer.init_state(2), block_size=5)
        unbounded = twin(x)
    assert state.metrics.get("evicted", 0) == 0
    assert (bounded - unbounded).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape,config", MATRIX)
def test_chunk_invariance(shape: str, config: str) -> None:
    layer_seed, input_seed = margin_safe_case(shape, config)
    layer = make_layer(shape, config, layer_seed)
    x = token_like(2, SEQ_LEN, layer.core.embed_dim, input_seed)
    S = layer.config.segment
    with torch.no_grad():
        reference, ref_state = layer.prefill_chunked(x, layer.init_state(2), block_size=SEQ_LEN)
        assert_routing_happened(layer, ref_state.metrics)
        for block in (1, 7, S, 3 * S + 5):
            y, state = layer.prefill_chunked(x, layer.init_state(2), block_size=block)
            assert (y - reference).abs().max().item() <= 1e-4, f"block_size={block}"
            assert_states_close(state, ref_state)
            assert (
                state.metrics["exact_inserts" if layer.config.num_landmarks_exact else "evicted"]
                == ref_state.metrics["exact_inserts" if layer.config.num_landmarks_exact else "evicted"]
            )


@pytest.mark.parametrize("shape,config", [("gqa", "full"), ("mqa-dh-not-d-over-h", "sinks-banks")])
def test_step_and_mixed_chunking_match_prefill(shape: str, config: str) -> None:
    layer_seed, input_seed = margin_safe_case(shape, config)
    layer = make_layer(shape, config, layer_seed)
    x = token_like(2, SEQ_LEN, layer.core.embed_dim, input_seed)
    with torch.no_grad():
        reference, ref_state = layer.prefill_chunked(x, layer.init_state(2), block_size=SEQ_LEN)
        state = layer.init_state(2)
        outputs = [layer.step(x[:, t : t + 1], state)[0] for t in range(SEQ_LEN)]
        assert (torch.cat(outputs, 1) - reference).abs().max().item() <= 1e-4
        assert_states_close(state, ref_state)
        # a mix: prefill 45, 13 steps, prefill the rest in blocks of 11
        state = layer.init_state(2)
        parts = [layer.prefill_chunked(x[:, :45], state, block_size=45)[0]]
        parts += [layer.step(x[:, t : t + 1], state)[0] for t in range(45, 58)]
        parts.append(layer.prefill_chunked(x[:, 58:], state, block_size=11)[0])
        assert (torch.cat(parts, 1) - reference).abs().max().item() <= 1e-4
        assert_states_close(state, ref_state)


@pytest.mark.parametrize("shape,config", MATRIX)
def test_forward_equals_prefill_and_gradients_flow(shape: str, config: str) -> None:
    layer_seed, input_seed = margin_safe_case(shape, config)
    layer = make_layer(shape, config, layer_seed)
    x = token_like(2, SEQ_LEN, layer.core.embed_dim, input_seed).requires_grad_(True)
    y, state = layer(x, return_state=True)
    with torch.no_grad():
        reference, ref_state = layer.prefill_chunked(x.detach(), layer.init_state(2), block_size=13)
    assert (y.detach() - reference).abs().max().item() <= 1e-4
    assert_states_close(state.detach(), ref_state)
    # weight the loss so it is not invariant to the head norm's scale
    loss = (y * torch.randn_like(y)).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    cfg = layer.config
    unused = set()
    if not cfg.num_landmarks_summary:
        unused.add("summary_rate_logit")
    if not (cfg.num_landmarks_exact or cfg.num_landmarks_summary):
        unused |= {"gate_proj.weight", "gate_proj.bias"}
    for name, param in layer.named_parameters():
        if name not in unused:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    if cfg.num_landmarks_exact or cfg.num_landmarks_summary:
        # the write gate learns only through bank writes; with Ms = 0 through the exact bank
        assert layer.gate_proj.weight.grad.abs().sum() > 0
        assert layer.gate_proj.bias.grad.abs().sum() > 0
    if cfg.num_landmarks_summary:
        assert layer.summary_rate_logit.grad.abs().sum() > 0
    if cfg.differential:
        assert layer.core.theta.grad.abs().sum() > 0
        assert layer.core.lambda_proj.weight.grad.abs().sum() > 0


def test_forward_continues_from_a_state() -> None:
    layer = make_layer("gqa", "full", *margin_safe_case("gqa", "full")[:1])
    x = token_like(2, SEQ_LEN, 64, margin_safe_case("gqa", "full")[1])
    with torch.no_grad():
        reference, ref_state = layer.prefill_chunked(x, layer.init_state(2), block_size=SEQ_LEN)
        first, mid = layer(x[:, :123], return_state=True)
        mid_copy = mid.clone()
        second, end = layer(x[:, 123:], state=mid, return_state=True)
    assert_states_close(mid, mid_copy, atol=0.0)  # forward never modifies its input state
    assert (torch.cat([first, second], 1) - reference).abs().max().item() <= 1e-4
    assert_states_close(end, ref_state)


@pytest.mark.parametrize(
    "shape,config", [("gqa", "full"), ("mha-odd-heads", "sinks-banks"), ("mqa-dh-not-d-over-h", "summary-only")]
)
def test_batch_rows_are_independent(shape: str, config: str) -> None:
    layer_seed, input_seed = margin_safe_case(shape, config, batch=3)
    layer = make_layer(shape, config, layer_seed)
    x = token_like(3, SEQ_LEN, layer.core.embed_dim, input_seed)
    with torch.no_grad():
        together, state = layer.prefill_chunked(x, layer.init_state(3), block_size=37)
        for row in range(3):
            alone, row_state = layer.prefill_chunked(x[row : row + 1], layer.init_state(1), block_size=37)
            assert (together[row : row + 1] - alone).abs().max().item() <= 1e-5
            assert torch.equal(state.ex_last[row : row + 1], row_state.ex_last)
            assert torch.equal(state.sm_filled[row : row + 1], row_state.sm_filled)


def test_cache_bytes_do_not_grow() -> None:
    layer = BoundedCoDAAttention(32, 2, 1, window=256, num_landmarks_exact=16, num_landmarks_summary=16)
    state = layer.init_state(1)
    with torch.inference_mode():
        layer.prefill_chunked(torch.randn(1, 10, 32), state)
        after_10 = state.nbytes()
        assert after_10 == layer.cache_bytes(1, torch.float32) == layer.cache_bytes(batch_size=1, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        for _ in range(99_990 // 4999):
            layer.prefill_chunked(torch.randn(1, 4999, 32, generator=gen), state, block_size=4999)
        layer.prefill_chunked(torch.randn(1, 100_000 - state.pos, 32, generator=gen), state)
    assert state.pos == 100_000
    assert state.nbytes() == after_10 == sum(t.nbytes for t in state.tensors().values())
    assert state.ex_filled.all() and state.sm_filled.all()


def test_bfloat16_runs_and_tracks_float32() -> None:
    layer = make_layer("gqa", "full")
    x = token_like(1, SEQ_LEN, 64, 0)
    with torch.no_grad():
        y32, _ = layer.prefill_chunked(x, layer.init_state(1), block_size=64)
        layer16 = make_layer("gqa", "full").to(torch.bfloat16)
        y16, state16 = layer16.prefill_chunked(x.bfloat16(), layer16.init_state(1), block_size=64)
        # window-only routing has no discrete decisions: chunking must not matter in bf16 either
        w16 = make_layer("gqa", "window-only").to(torch.bfloat16)
        a, _ = w16.prefill_chunked(x.bfloat16(), w16.init_state(1), block_size=SEQ_LEN)
        b, _ = w16.prefill_chunked(x.bfloat16(), w16.init_state(1), block_size=7)
    assert state16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    # the first window's outputs have no routing: bf16 within its rounding of float32
    w = layer.config.window
    rel = (y16[:, :w].float() - y32[:, :w]).norm() / y32[:, :w].norm()
    assert rel < 3e-2
    assert (a.float() - b.float()).abs().max().item() <= 2e-2


def test_clone_forks_the_state() -> None:
    layer = make_layer("gqa", "full")
    x = token_like(1, SEQ_LEN, 64, 5)
    with torch.no_grad():
        _, state = layer.prefill_chunked(x[:, :150], layer.init_state(1))
        fork = state.clone()
        a, state = layer.prefill_chunked(x[:, 150:], state)
        assert fork.pos == 150  # advancing the original leaves the fork where it was
        b, fork = layer.prefill_chunked(x[:, 150:], fork)
    assert torch.equal(a, b)
    for name, tensor in state.tensors().items():
        assert torch.equal(getattr(fork, name), tensor), name


def test_exact_routing_can_be_observed() -> None:
    """``kernels.routing_reference.observe_exact_routing`` sees each segment's exact-bank routing on the reference path,
    with the banks before and after it, and nothing once its block ends."""
    from coda_gqa_l import BoundedConfig
    from coda_gqa_l.kernels.dispatch import plain_reference
    from coda_gqa_l.kernels.routing_reference import ExactRouting, observe_exact_routing

    config = BoundedConfig(window=32, num_landmarks_exact=8, num_landmarks_summary=4, segment=8)
    layer = BoundedCoDAAttention(32, 4, 2, config=config).eval()
    seen: list[ExactRouting] = []
    x = torch.randn(1, 80, 32)
    with torch.no_grad(), plain_reference(), observe_exact_routing(seen.append):
        _, state = layer.prefill_chunked(x[:, :64], layer.init_state(1, "cpu", torch.float32), block_size=16)
    assert len(seen) == (64 - 32) // 8  # one routing per segment that left the window
    assert [int(r.token_index[0]) for r in seen] == [0, 8, 16, 24]
    assert torch.equal(seen[-1].after.ex_k, state.ex_k) and seen[0].before.ex_filled.sum() == 0
    with torch.no_grad(), plain_reference():
        layer.prefill_chunked(x[:, 64:], state, block_size=16)
    assert len(seen) == 4


def test_noise_tables_are_kept_until_theta_changes() -> None:
    """The inference paths' float32 noise tables are built once per theta, and again after it changes in place."""
    from coda_gqa_l.primitives import expand_pairs

    core = make_layer("gqa", "full").to(torch.bfloat16).core
    assert core.theta is not None
    first = core.noise_tables()
    assert first is not None and first[0].dtype == torch.float32
    assert core.noise_tables() is first
    with torch.no_grad():
        core.theta.add_(0.25)
    again = core.noise_tables()
    assert again is not first
    angles = core.theta.float()
    expected = expand_pairs(angles.cos(), angles.sin(), core.rope.layout)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])


def test_project_out_writes_what_the_module_computes() -> None:
    """``project_out(heads, into)`` (``CapturedPrefill``'s graphs write their output buffer through it) equals
    ``W_o(heads)`` for a plain linear, with a bias, under a LoRA adapter and under a forward hook, which must not be
    bypassed; a buffer of another shape is named."""
    from coda_gqa_l.models.lora import LoRALinear

    layer = make_layer("gqa", "full").eval()
    heads = torch.randn(2, 5, layer.core.o_proj.in_features)
    width = layer.core.o_proj.out_features

    def check() -> None:
        with torch.no_grad():
            into = torch.full((2, 5, width), float("nan"))
            assert layer.project_out(heads, into) is into
            torch.testing.assert_close(into, layer.core.o_proj(heads), rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        layer.core.o_proj.bias = torch.nn.Parameter(torch.randn(width))
    check()
    layer.core.o_proj = LoRALinear(layer.core.o_proj, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.core.o_proj.lora_b.normal_()  # a non-zero adapter term, which a direct product would leave out
    check()
    layer.core.o_proj = layer.core.o_proj.base
    hook = layer.core.o_proj.register_forward_hook(lambda module, args, out: out * 2)
    check()
    hook.remove()
    with pytest.raises(ValueError, match="contiguous tensor of shape"):
        layer.project_out(heads, torch.empty(2, 4, width))
