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


def _decode_growing(layer: torch.nn.Module, x: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = layer.init_cache(x.shape[0])
    parts = [layer(x[:, :prompt], cache)]
    parts += [layer(x[:, t : t + 1], cache) for t in range(prompt, x.shape[1])]
    return torch.cat(parts, 1)


@pytest.mark.parametrize("cls", [BaselineGQA, CoDAGQA])
@pytest.mark.parametrize("prompt", [1, 13])
def test_static_cache_decoding_equals_growing_cache(cls, prompt) -> None:
    torch.manual_seed(0)
    layer = cls(64, 4, 2, head_dim=24, rope_base=50000.0)
    x = torch.randn(2, 30, 64)
    with torch.no_grad():
        expected = _decode_growing(layer, x, prompt)
        cache = layer.init_static_cache(2, max_len=37)
        parts = [layer(x[:, :prompt], cache)]
        parts += [layer.step_static(x[:, t : t + 1], cache) for t in range(prompt, 30)]
    assert cache.pos == 30 and cache.position.dtype == torch.int64 and cache.position.dim() == 0
    assert cache.nbytes() == 2 * 2 * 2 * 37 * 24 * 4
    assert (torch.cat(parts, 1) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("cls", [BaselineGQA, CoDAGQA])
def test_static_steps_on_the_split_kernel_equal_the_masked_sdpa_steps(cls, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton path (the interpreter on a CPU) finds the written slots from the position on the device and reads
    no slot past it: slots past the position hold garbage here, which neither path attends."""
    from coda_gqa_l.kernels import diff_attention_triton, dispatch

    torch.manual_seed(3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = cls(64, 4, 2, head_dim=32, rope_base=50000.0).to(device)
    x = torch.randn(2, 90, 64, device=device)
    launches: list[str] = []
    real_launch = dispatch.launch

    def counted(kernel, *args, **kwargs):  # type: ignore[no-untyped-def]
        launches.append(getattr(kernel, "__name__", str(kernel)))
        return real_launch(kernel, *args, **kwargs)

    def decode(kernels: str) -> torch.Tensor:
        monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
        cache = layer.init_static_cache(2, max_len=200)
        cache.k.normal_().mul_(1e3)  # never attended: a weight on one shows in the outputs
        cache.v.normal_().mul_(1e3)
        with torch.no_grad():
            parts = [layer(x[:, :7], cache)]
            monkeypatch.setenv(dispatch.BACKEND_ENV, kernels)
            parts += [layer.step_static(x[:, t : t + 1], cache) for t in range(7, 90)]  # 90 > one 64-key tile
        assert cache.pos == 90
        return torch.cat(parts, 1)

    expected = decode("torch")
    monkeypatch.setattr(dispatch, "launch", counted)
    monkeypatch.setattr("coda_gqa_l.kernels.diff_attention.launch", counted)
    got = decode("triton")
    assert "_decode_split_kernel" in launches  # the split kernel really ran
    if device == "cpu":
        assert type(diff_attention_triton._decode_split_kernel).__name__ == "InterpretedFunction"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_static_step_with_autograd_on_keeps_the_masked_sdpa_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split kernel is forward only: a step taken with autograd on (parameters that want gradients) still runs,
    on the masked SDPA path, and gives what the kernel gives without autograd."""
    from coda_gqa_l.kernels import dispatch

    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    torch.manual_seed(0)
    layer = CoDAGQA(32, 4, 2)
    x = torch.randn(1, 3, 32)
    outputs = []
    for grad in (True, False):
        cache = layer.init_static_cache(1, max_len=8)
        with torch.set_grad_enabled(grad):
            outputs.append(torch.cat([layer.step_static(x[:, t : t + 1], cache) for t in range(3)], 1))
    assert outputs[0].requires_grad and not outputs[1].requires_grad
    torch.testing.assert_close(outputs[0].detach(), outputs[1], atol=1e-5, rtol=1e-5)


def test_static_cache_steps_from_empty_and_chunks_continue_it() -> None:
    torch.manual_seed(1)
    layer = CoDAGQA(48, 6, 3)
    x = torch.randn(1, 20, 48)
    with torch.no_grad():
        expected = layer(x)
        cache = layer.init_static_cache(1, max_len=20)
        parts = [layer.step_static(x[:, t : t + 1], cache) for t in range(5)]
        parts.append(layer(x[:, 5:12], cache))  # a chunk after steps: the position is read back
        parts += [layer.step_static(x[:, t : t + 1], cache) for t in range(12, 20)]
    assert (torch.cat(parts, 1) - expected).abs().max().item() < 1e-5


def test_static_cache_refuses_overflow_and_bad_shapes() -> None:
    layer = BaselineGQA(32, 4, 2)
    cache = layer.init_static_cache(1, max_len=4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        layer(torch.randn(1, 5, 32), cache)
    with pytest.raises(ValueError, match=r"x_t must have shape \(batch, 1, 32\)"):
        layer.step_static(torch.randn(1, 2, 32), cache)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        layer.init_static_cache(1, max_len=0)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [BaselineGQA, CoDAGQA])
def test_static_step_replays_under_a_cuda_graph(cls) -> None:
    torch.manual_seed(0)
    layer = cls(128, 8, 2).cuda()
    x = torch.randn(1, 24, 128, device="cuda")
    with torch.no_grad():
        expected = layer(x)
        cache = layer.init_static_cache(1, max_len=32)
        layer(x[:, :4], cache)
        static_x = x[:, 4:5].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream, then rewind the position
            layer.step_static(static_x, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.position.fill_(4)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer.step_static(static_x, cache)
        outputs = []
        for t in range(4, 24):
            static_x.copy_(x[:, t : t + 1])
            graph.replay()
            outputs.append(static_y.clone())
    assert cache.pos == 24
    assert (torch.cat(outputs, 1) - expected[:, 4:]).abs().max().item() < 1e-4
