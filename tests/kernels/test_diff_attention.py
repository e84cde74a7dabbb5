"""The fused differential attention kernel against its PyTorch reference (docs/kernels.md;
invariant 7 of docs/semantics.md section 5).

On a CPU the Triton kernels run in Triton's interpreter in float32 (conftest sets
``TRITON_INTERPRET=1`` before triton is imported); on a GPU the same tests run compiled, and
the ``gpu`` tests add bfloat16 with the 2x-error rule. Inputs are fresh random draws each time.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import CONFIGS, SEQ_LEN, make_layer, margin_safe_case, record_rotated_forwards, token_like

from coda_gqa_l.kernels import BACKEND_ENV, backend, diff_attention, dispatch
from coda_gqa_l.kernels.diff_attention import (
    KEYS_FROM_ZERO,
    SEGMENT_WINDOW,
    Pattern,
    differential_attention,
    fused_attention,
    reference_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def use_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "triton")


def test_interpreter_really_runs_on_cpu(use_triton: None) -> None:
    from coda_gqa_l.kernels import diff_attention_triton

    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(diff_attention_triton._fwd_kernel).__name__ == "InterpretedFunction"
    assert backend(DEVICE) == "triton"


def test_backend_env_forces_either(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert backend(DEVICE) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert backend("cpu") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="CODA_GQA_L_KERNELS"):
        backend("cpu")


def _problem(
    *,
    batch: int,
    kv_heads: int,
    group: int,
    length: int,
    head_dim: int,
    keys: int,
    extras: int,
    segments: int,
    differential: bool,
    norm: bool,
    dtype: torch.dtype,
    seed: int,
) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype).requires_grad_()

    streams = 2 * group if differential else group
    tensors: dict[str, torch.Tensor | None] = {
        "q": rand(batch, kv_heads, streams, length, head_dim),
        "k": rand(batch, kv_heads, keys, head_dim),
        "v": rand(batch, kv_heads, keys, head_dim),
        "lam": None,
        "extra_k": None,
        "extra_v": None,
        "extra_bias": None,
        "norm_weight": None,
    }
    if differential:
        lam = 0.6 * torch.rand(batch, kv_heads * group, length, generator=gen, device=DEVICE)
        tensors["lam"] = lam.requires_grad_()
    if norm:
        weight = 1 + 0.2 * torch.randn(kv_heads * group, head_dim, generator=gen, device=DEVICE)
        tensors["norm_weight"] = weight.to(dtype).requires_grad_()
    if extras:
        tensors["extra_k"] = rand(batch, kv_heads, segments, extras, head_dim)
        tensors["extra_v"] = rand(batch, kv_heads, segments, extras, head_dim)
        bias = torch.log(torch.rand(batch, kv_heads, segments, extras, generator=gen, device=DEVICE))
        bias[..., -1] = float("-inf")  # an empty bank slot
        tensors["extra_bias"] = bias.requires_grad_()
    return tensors


CASES = {
    # name: (pattern, q_start, length, head_dim, group, extras, differential, norm)
    "causal": (Pattern(), 0, 70, 16, 2, 0, True, True),
    "causal-plain-gqa": (Pattern(), 0, 40, 16, 3, 0, False, False),
    "bounded-midsegment-sinks": (Pattern(True, 32, 8, 3), 45, 30, 16, 2, 8, True, True),
    "bounded-from-zero": (Pattern(True, 32, 8, 3), 0, 70, 12, 1, 7, True, False),
    "bounded-seg64": (Pattern(True, 256, 64, 4), 300, 200, 16, 1, 24, True, True),
}


def _run(
    name: str, dtype: torch.dtype, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Outputs and gradients of the kernel, the float64 reference and the same-dtype reference."""
    pattern, q_start, length, head_dim, group, extras, differential, norm = CASES[name]
    k_offset = pattern.window if pattern.bounded else 0
    keys = length + k_offset
    segments = (q_start + length - 1) // pattern.segment - q_start // pattern.segment + 1
    tensors = _problem(
        batch=2,
        kv_heads=2,
        group=group,
        length=length,
        head_dim=head_dim,
        keys=keys,
        extras=extras,
        segments=segments,
        differential=differential,
        norm=norm,
        dtype=dtype,
        seed=seed,
    )
    names = [key for key, value in tensors.items() if value is not None]
    inputs = [tensors[key] for key in names]
    kwargs = dict(q_start=q_start, k_offset=k_offset, scale=head_dim**-0.5, pattern=pattern)
    args = {key: tensors[key] for key in ("extra_k", "extra_v", "extra_bias", "norm_weight")}
    q, k, v, lam = tensors["q"], tensors["k"], tensors["v"], tensors["lam"]
    assert q is not None and k is not None and v is not None
    out = fused_attention(q, k, v, lam, **kwargs, **args)  # type: ignore[arg-type]
    grad = torch.randn_like(out)
    results = []
    for result in (
        out,
        reference_attention(q, k, v, lam, **kwargs, **args, compute_dtype=torch.float64),  # type: ignore[arg-type]
        reference_attention(q, k, v, lam, **kwargs, **args, compute_dtype=dtype),  # type: ignore[arg-type]
    ):
        grads = torch.autograd.grad(result, inputs, grad)  # type: ignore[arg-type]
        results.append([result.detach().double(), *(g.double() for g in grads)])
    return results[0], results[1], results[2], ["out", *names]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dots", [None, pytest.param("tf32x3", marks=pytest.mark.gpu)])
def test_kernel_matches_reference_in_float32(
    name: str, dots: str | None, use_triton: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward and gradients in float32; on a GPU also with float32 tiles as three TF32 products (what the neural
    database on CUDA asks for, ``dispatch.float32_dots``: the exact float32 forward takes about 20 s to compile)."""
    if dots is not None:
        monkeypatch.setenv(dispatch.FP32_DOTS_ENV, dots)
    _check_float32(name)


def _check_float32(name: str) -> None:
    kernel, exact, ref32, labels = _run(name, torch.float32, seed=int(torch.randint(0, 2**31, ()).item()))
    for label, ours, truth, theirs in zip(labels, kernel, exact, ref32, strict=True):
        err = (ours - truth).abs().max().item()
        ref_err = (theirs - truth).abs().max().item()
        scale = truth.abs().max().item()
        # docs/kernels.md section 3: at most twice the float32 reference's own error (plus a rounding floor)
        assert err <= 2 * ref_err + 2e-6 * max(scale, 1.0), f"{name}/{label}: {err:.2e} vs reference {ref_err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference_in_bfloat16(name: str, use_triton: None) -> None:
    _check_bfloat16(name)


def _check_bfloat16(name: str) -> None:
    kernel, exact, ref_bf16, labels = _run(name, torch.bfloat16, seed=int(torch.randint(0, 2**31, ()).item()))
    for label, ours, truth, theirs in zip(labels, kernel, exact, ref_bf16, strict=True):
        err = (ours - truth).norm().item()
        ref_err = (theirs - truth).norm().item()
        assert err <= 2 * ref_err + 1e-3 * truth.norm().item(), f"{name}/{label}: {err:.3e} vs {ref_err:.3e}"


# on the CPU (the interpreter) a few cases: the plain GQA rows, sinks mid-segment, segments of 64
_OTHER_LAYOUT_ON_CPU = ("bounded-midsegment-sinks", "bounded-seg64", "causal-plain-gqa")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_other_stream_layout_matches_reference(
    name: str, use_triton: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward with the layout of the two streams it does not ship (``diff_attention.STREAMS_AS_ROWS``: both
    streams' queries the rows of one tile, or two tiles) against the reference: float32, and bfloat16 on a GPU."""
    if DEVICE == "cpu" and name not in _OTHER_LAYOUT_ON_CPU:
        pytest.skip("the interpreter runs a few cases of the other layout (CPU suite time)")
    monkeypatch.setattr(diff_attention, "STREAMS_AS_ROWS", not diff_attention.STREAMS_AS_ROWS)
    _check_float32(name)
    if DEVICE == "cuda":
        _check_bfloat16(name)


# ------------------------------------------------------------------ a one-token step (the split forward)
DECODE_CASES = {
    # name: (pattern, q_start, main keys, k_offset, head_dim, group, extras, differential, norm)
    "causal": (Pattern(), 200, 201, 200, 16, 2, 0, True, True),
    "causal-long-stretches": (Pattern(), 4000, 4001, 4000, 16, 1, 0, True, False),  # 63 tiles in 32 stretches
    "causal-plain-gqa": (Pattern(), 90, 91, 90, 12, 3, 0, False, False),
    "bounded-midsegment": (Pattern(True, 32, 8, 3), 45, 33, 32, 16, 2, 7, True, True),
    "bounded-sink-token": (Pattern(True, 32, 8, 3), 1, 33, 32, 16, 2, 7, True, False),  # sinks follow causality
    "extras-only": (Pattern(True, 32, 8, 3), 40, 0, 0, 16, 2, 7, True, True),  # no main keys at all
    "bounded-many-extras": (Pattern(True, 64, 8, 4), 301, 65, 64, 16, 2, 150, True, True),  # three extra chunks
    "segment-window": (Pattern(True, 32, 8, 3), 46, 32, SEGMENT_WINDOW, 16, 2, 7, True, True),
    "segment-window-first": (Pattern(True, 256, 64, 4), 8192, 256, SEGMENT_WINDOW, 64, 3, 128, True, True),
    "static-cache": (Pattern(), 90, 200, KEYS_FROM_ZERO, 16, 4, 0, False, False),  # slots past the token unattended
    "causal-group-8": (Pattern(), 150, 151, 150, 16, 8, 0, True, True),  # eight query heads a program
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
@pytest.mark.parametrize(
    "dtype, dots",
    [(torch.float32, None), pytest.param(torch.float32, "tf32x3", marks=pytest.mark.gpu),
     pytest.param(torch.bfloat16, None, marks=pytest.mark.gpu)],
)  # fmt: skip
def test_one_token_step_matches_reference(
    name: str, dtype: torch.dtype, dots: str | None, use_triton: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step (one query row, no gradient) runs the split forward and its combine: the reference's output
    within the dtype's rule (twice the same-dtype reference's error against float64, plus a rounding floor); in
    float32 also with three TF32 products per tile (the neural database's choice on CUDA)."""
    if dots is not None:
        monkeypatch.setenv(dispatch.FP32_DOTS_ENV, dots)
    pattern, q_start, keys, k_offset, head_dim, group, extras, differential, norm = DECODE_CASES[name]
    with torch.no_grad():
        tensors = _problem(
            batch=2, kv_heads=2, group=group, length=1, head_dim=head_dim, keys=keys, extras=extras, segments=1,
            differential=differential, norm=norm, dtype=dtype, seed=int(torch.randint(0, 2**31, ()).item()),
        )  # fmt: skip
        q, k, v, lam = tensors["q"], tensors["k"], tensors["v"], tensors["lam"]
        assert q is not None and k is not None and v is not None
        args = {key: tensors[key] for key in ("extra_k", "extra_v", "extra_bias", "norm_weight")}
        ours = fused_attention(q, k, v, lam, q_start=q_start, k_offset=k_offset, scale=head_dim**-0.5,
                               pattern=pattern, **args)  # type: ignore[arg-type]  # fmt: skip
        with dispatch.one_program_decode():  # the forward's one program per head, on the same inputs
            one = fused_attention(q, k, v, lam, q_start=q_start, k_offset=k_offset, scale=head_dim**-0.5,
                                  pattern=pattern, **args)  # type: ignore[arg-type]  # fmt: skip
        if k_offset == SEGMENT_WINDOW:  # the buffer's first key is token b - W + S
            S = pattern.segment
            k_offset = q_start - ((q_start // S) * S - pattern.window + S)
        elif k_offset == KEYS_FROM_ZERO:
            k_offset = q_start
        kwargs = dict(q_start=q_start, k_offset=k_offset, scale=head_dim**-0.5, pattern=pattern, **args)
        exact = reference_attention(q, k, v, lam, **kwargs, compute_dtype=torch.float64)  # type: ignore[arg-type]
        same = reference_attention(q, k, v, lam, **kwargs, compute_dtype=dtype)  # type: ignore[arg-type]
    err = (ours.double() - exact).abs().max().item()
    ref_err = (same.double() - exact).abs().max().item()
    floor = (2e-6 if dtype == torch.float32 else 1e-2) * max(exact.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + floor, f"{name}: {err:.2e} against the reference's {ref_err:.2e}"
    one_err = (one.double() - exact).abs().max().item()
    assert one_err <= 2 * ref_err + floor, f"{name}, one program: {one_err:.2e} against {ref_err:.2e}"


def test_differential_attention_is_causal_and_differentiable(use_triton: None) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    q = torch.randn(1, 2, 4, 33, 16, generator=gen, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 33, 16, generator=gen, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 33, 16, generator=gen, device=DEVICE, requires_grad=True)
    lam = torch.rand(1, 4, 33, generator=gen, device=DEVICE)
    out = differential_attention(q, k, v, lam, scale=0.25)
    assert out.shape == (1, 33, 4, 16)
    # token 10's output must not depend on token 20
    (grad_k,) = torch.autograd.grad(out[:, 10].sum(), k)
    assert grad_k[:, :, 11:].abs().max() == 0
    assert grad_k[:, :, :11].abs().max() > 0


def test_bad_shapes_are_named(use_triton: None) -> None:
    q = torch.randn(1, 2, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="lam must be"):
        fused_attention(q, k, k, torch.rand(1, 3, 8), q_start=0, k_offset=0, scale=1.0)
    with pytest.raises(ValueError, match="k must be"):
        fused_attention(q, k[:, :1], k, None, q_start=0, k_offset=0, scale=1.0)
    with pytest.raises(TypeError, match="dtype"):
        fused_attention(q, k.double(), k, None, q_start=0, k_offset=0, scale=1.0)


# ------------------------------------------------------------------ the whole bounded layer
LAYER_CONFIGS = ["full", "sinks-banks", "absolute", "plain-gqa", "window-only"]


@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_layer_triton_path_equals_reference_path(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounded layer with the fused kernel equals the block-sparse reference: outputs of
    chunked prefill and step, the state, and every parameter's gradient through forward."""
    assert config in CONFIGS
    layer_seed, input_seed = margin_safe_case("gqa", config)
    layer = make_layer("gqa", config, layer_seed).to(DEVICE)
    x = token_like(2, SEQ_LEN, layer.core.embed_dim, input_seed).to(DEVICE)
    results = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, choice)
        with torch.no_grad():
            y, state = layer.prefill_chunked(x[:, :250], layer.init_state(2), block_size=97)
            # steps up to and past the segment boundary at 256 (each step is slow in the interpreter)
            steps = [layer.step(x[:, t : t + 1], state)[0] for t in range(250, 258)]
        layer.zero_grad()
        layer(x[:, :200]).pow(2).mean().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
        results[choice] = (torch.cat([y, *steps], dim=1), state, grads)
    (y_ref, s_ref, g_ref), (y_tri, s_tri, g_tri) = results["torch"], results["triton"]
    torch.testing.assert_close(y_tri, y_ref, atol=1e-4, rtol=1e-4)
    for name in ("ex_k", "ex_v", "ex_last", "ex_filled", "sm_k", "sm_v", "sm_filled", "win_k"):
        torch.testing.assert_close(getattr(s_tri, name), getattr(s_ref, name), atol=1e-4, rtol=1e-4)
    assert g_tri.keys() == g_ref.keys()
    if config != "window-only":
        assert "gate_proj.weight" in g_ref  # the gate gets gradient through the bank logit offsets
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("unbounded", ["fused", "sdpa"])
def test_unbounded_coda_layer_uses_the_kernel(unbounded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``CoDAGQA`` on the Triton backend equals the PyTorch reference, with a cache and through
    backward, on both unbounded paths (``fused``: our kernel everywhere; ``sdpa``, the default:
    rotation + SDPA + combine kernels without a prefix, our kernel for the cached second chunk)."""
    from coda_gqa_l import CoDAGQA
    from coda_gqa_l.kernels import UNBOUNDED_ENV

    monkeypatch.setenv(UNBOUNDED_ENV, unbounded)

    torch.manual_seed(0)
    layer = CoDAGQA(64, 4, 2).to(DEVICE)
    with torch.no_grad():
        layer.core.lambda_proj.bias.fill_(-1.0)  # a lambda far from 0, so the noise stream matters
    x = torch.randn(2, 45, 64, device=DEVICE)
    results = []
    for choice in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, choice)
        cache = layer.init_cache(2)
        y = torch.cat([layer(x[:, :30], cache), layer(x[:, 30:], cache)], dim=1)
        layer.zero_grad()
        layer(x).square().mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.gpu
def test_tuned_kernels_keep_their_timings_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """With autotuning on, the tuning results go to Triton's disk cache, so a later process does not tune again
    (where the installed Triton has the option)."""
    import inspect

    import triton

    from coda_gqa_l.kernels import diff_attention

    monkeypatch.setattr(diff_attention, "autotune", lambda: True)
    diff_attention._kernels.cache_clear()
    try:
        kernels = diff_attention._kernels()
        assert kernels["tuned"]
        if "cache_results" in inspect.signature(triton.autotune).parameters:
            assert all(kernels[name].cache_results for name in ("fwd", "dkdv", "dq"))
    finally:
        diff_attention._kernels.cache_clear()


# ------------------------------------------------------------------ RoPE and the noise rotation in the forward
ROTATION_CASES = {
    # name: (pattern, q_start, length, k_offset, head_dim, group, extras, differential, layout); batch 2
    "bounded-half": (Pattern(True, 32, 8, 3), 45, 20, 32, 16, 2, 7, True, "half"),  # two half tiles
    "causal-interleaved": (Pattern(), 0, 37, 0, 32, 3, 0, True, "interleaved"),  # partners gathered
    "bounded-half-dh24": (Pattern(True, 32, 8, 3), 9, 26, 32, 24, 2, 5, True, "half"),  # padded: partners gathered
    "bounded-plain-gqa": (Pattern(True, 32, 8, 3), 3, 30, 32, 16, 2, 5, False, "half"),
}


@pytest.mark.parametrize("name", sorted(ROTATION_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_rotation_in_the_forward_matches_the_stacking_pass(
    name: str, dtype: torch.dtype, use_triton: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rotated_fused_attention`` with RoPE and the noise angles applied in the forward's prologue
    (``diff_attention.ROTATE_IN_FORWARD``) against the same queries stacked first (``rope.stack_rotated_queries``)
    and against the float64 reference of the rotated queries; the queries as the projection leaves them
    (``(B, L, H, Dh)`` viewed as ``(B, H, L, Dh)``)."""
    from coda_gqa_l.kernels.rope import stack_rotated_queries_reference
    from coda_gqa_l.primitives import expand_pairs

    pattern, q_start, L, k_offset, D, group, E, differential, layout = ROTATION_CASES[name]
    B, Hkv = 2, 2
    H = Hkv * group
    gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE)

    x = rand(B, L, H, D).to(dtype).transpose(1, 2)  # the projection's layout, read in place
    LK = L + k_offset
    k, v = rand(B, Hkv, LK, D).to(dtype), rand(B, Hkv, LK, D).to(dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float64) / D)
    angles = (q_start + torch.arange(L, device=DEVICE, dtype=torch.float64))[:, None] * inv_freq[None, :]
    cos, sin = (t.float().contiguous() for t in expand_pairs(angles.cos(), angles.sin(), layout))
    theta = rand(H, D // 2).double()
    t_cos, t_sin = (t.float().contiguous() for t in expand_pairs(theta.cos(), theta.sin(), layout))
    lam = (0.1 + 0.5 * torch.rand(B, H, L, generator=gen, device=DEVICE)) if differential else None
    extras: dict[str, torch.Tensor | None] = {"extra_k": None, "extra_v": None, "extra_bias": None}
    if E:
        nseg = (q_start + L - 1) // pattern.segment - q_start // pattern.segment + 1
        extras = {"extra_k": rand(B, Hkv, nseg, E, D).to(dtype), "extra_v": rand(B, Hkv, nseg, E, D).to(dtype),
                  "extra_bias": torch.rand(B, Hkv, nseg, E, generator=gen, device=DEVICE).log()}  # fmt: skip
    rotation = diff_attention.Rotation(cos, sin, t_cos if differential else None, t_sin if differential else None,
                                       layout)  # fmt: skip
    args = dict(q_start=q_start, k_offset=k_offset, scale=D**-0.5, pattern=pattern, **extras)
    rotated_in_forward = record_rotated_forwards(monkeypatch)
    with torch.no_grad():
        monkeypatch.setattr(diff_attention, "ROTATE_IN_FORWARD", True)
        fused = diff_attention.rotated_fused_attention(x, rotation, Hkv, k, v, lam, **args).double()  # type: ignore[arg-type]
        monkeypatch.setattr(diff_attention, "ROTATE_IN_FORWARD", False)
        stacked = diff_attention.rotated_fused_attention(x, rotation, Hkv, k, v, lam, **args).double()  # type: ignore[arg-type]
    assert rotated_in_forward == [True, False]
    exact_q = stack_rotated_queries_reference(x.double(), cos.double(), sin.double(), *(
        (t_cos.double(), t_sin.double()) if differential else (None, None)), Hkv, layout)  # fmt: skip
    as64 = {key: (t.double() if t is not None else None) for key, t in extras.items()}
    truth = reference_attention(exact_q, k.double(), v.double(), lam.double() if lam is not None else None,
                                **{**args, **as64})  # type: ignore[arg-type]  # fmt: skip
    err, stacked_err = (fused - truth).abs().max().item(), (stacked - truth).abs().max().item()
    if dtype == torch.float32:
        assert (fused - stacked).abs().max().item() <= 1e-5 * max(truth.abs().max().item(), 1.0)
    assert err <= 2 * stacked_err + 2e-6 * max(truth.abs().max().item(), 1.0), f"{err:.2e} vs stacked {stacked_err:.2e}"


def test_rotated_attention_refuses_what_it_cannot_take(use_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear errors, before any launch: a lambda of the wrong shape (the stacked path's checks), noise angles without
    a lambda, and inputs that want gradients (the rotated path is for inference)."""
    monkeypatch.setattr(diff_attention, "ROTATE_IN_FORWARD", True)
    q, k = torch.randn(1, 4, 10, 16, device=DEVICE), torch.randn(1, 2, 42, 16, device=DEVICE)
    ones = torch.ones(4, 16, device=DEVICE)
    rotation = diff_attention.Rotation(torch.ones(10, 16, device=DEVICE), torch.zeros(10, 16, device=DEVICE), ones,
                                       0 * ones, "half")  # fmt: skip
    args = dict(q_start=0, k_offset=32, scale=0.25)
    with torch.no_grad(), pytest.raises(ValueError, match="lam must be"):
        diff_attention.rotated_fused_attention(q, rotation, 2, k, k, torch.rand(1, 4, 9, device=DEVICE), **args)  # type: ignore[arg-type]
    with torch.no_grad(), pytest.raises(ValueError, match="noise heads need both"):
        diff_attention.rotated_fused_attention(q, rotation, 2, k, k, None, **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="for inference"):
        diff_attention.rotated_fused_attention(
            q.requires_grad_(),
            rotation,
            2,
            k,
            k,
            torch.rand(1, 4, 10, device=DEVICE),
            **args,  # type: ignore[arg-type]
        )
