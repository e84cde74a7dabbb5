"""Fused differential attention: the dispatching entry points, the autograd and ``torch.compile``
registration, and the PyTorch reference the kernels are tested against.

Problem (shapes; ``Q`` stacked query heads per KV head, ``2G`` when differential, else ``G``):

* ``q (B, Hkv, Q, L, Dh)``: queries after RoPE, of tokens ``q_start .. q_start + L - 1``;
  streams ``[0, G)`` are the signal heads of the KV group, ``[G, 2G)`` their noise heads;
* ``k, v (B, Hkv, LK, Dh)``: main keys (after RoPE) and values of tokens
  ``q_start - k_offset .. q_start - k_offset + LK - 1``; or, with ``k_offset=SEGMENT_WINDOW`` (bounded, forward
  only, queries in one segment starting at ``b``), of tokens ``b - W + S .. b - W + S + LK - 1``: a buffer that holds
  one segment's window, which a graph decoder fills once per segment and then one token per step; or, with
  ``k_offset=KEYS_FROM_ZERO`` (forward only), of tokens ``0 .. LK - 1`` (a static cache, its unwritten slots past
  the queries never attended: whole tiles past the token are not loaded, the rest of its tile weighs 0);
* ``lam (B, H, L)`` float32, or None (plain attention, ``Q = G``);
* bounded pattern only: ``extra_k, extra_v (B, Hkv, nseg, E, Dh)`` and
  ``extra_bias (B, Hkv, nseg, E)`` float32: per segment of the chunk, the sinks (first
  ``num_sink``) and bank slots with their logit offsets;
* ``norm_weight (H, Dh)`` or None: per-head RMSNorm of the combined output.

Output ``(B, L, H, Dh)``: ``N(attn(q_sig) - lam * attn(q_noise))`` per head, ready for ``W_o``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..primitives import RopeLayout
from .dispatch import autotune, dependent_launch_meta, float32_dots, launch, split_decode, tile_size, use_triton

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Pattern:
    """Which keys a query sees: plain causal (``bounded=False``) or the bounded window (docs/semantics.md section 3)."""

    bounded: bool = False
    window: int = 0
    segment: int = 1
    num_sink: int = 0


CAUSAL = Pattern()

# ``k_offset`` for keys that are the query segment's window buffer (module docstring); negative, so the kernel tells
# it from an offset
SEGMENT_WINDOW = -1
# ``k_offset`` for keys that start at token 0 whatever ``q_start`` is: a preallocated cache read at a position held on
# the device (``BaselineGQA.step_static`` under a CUDA graph), where the offset, ``q_start``, is not known on the host
KEYS_FROM_ZERO = -2


# ---------------------------------------------------------------------------------------------
# PyTorch reference: a dense mask over (main keys + the row's segment extras), float32 or higher
# ---------------------------------------------------------------------------------------------
def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor | None,
    *,
    q_start: int,
    k_offset: int,
    scale: float,
    pattern: Pattern = CAUSAL,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    extra_bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The same function as the fused kernel, written plainly (used by tests and on the CPU)."""
    B, Hkv, Qs, L, D = q.shape
    LK = k.shape[2]
    device = q.device
    t = q_start + torch.arange(L, device=device)
    j = q_start - k_offset + torch.arange(LK, device=device)
    if pattern.bounded:
        S = pattern.segment
        low = torch.clamp((t // S) * S - pattern.window + S, min=pattern.num_sink)
    else:
        low = torch.zeros_like(t)
    low = low.clamp(min=0)
    main_ok = (j[None, :] <= t[:, None]) & (j[None, :] >= low[:, None])  # (L, LK)
    qc = q.to(compute_dtype)
    scores = torch.einsum("bhsld,bhkd->bhslk", qc, k.to(compute_dtype)) * scale
    scores = scores.masked_fill(~main_ok, float("-inf"))
    values = [v.to(compute_dtype)[:, :, None].expand(B, Hkv, L, LK, D)]
    if extra_k is not None and extra_v is not None and extra_bias is not None and extra_k.shape[3] > 0:
        E = extra_k.shape[3]
        row_seg = t // pattern.segment - q_start // pattern.segment  # (L,)
        ek = extra_k.to(compute_dtype)[:, :, row_seg]  # (B, Hkv, L, E, D)
        ev = extra_v.to(compute_dtype)[:, :, row_seg]
        eb = extra_bias.to(compute_dtype)[:, :, row_seg]  # (B, Hkv, L, E)
        e = torch.arange(E, device=device)
        extra_ok = (e[None, :] >= pattern.num_sink) | (e[None, :] <= t[:, None])  # (L, E)
        extra_scores = torch.einsum("bhsld,bhled->bhsle", qc, ek) * scale + eb[:, :, None]
        extra_scores = extra_scores.masked_fill(~extra_ok, float("-inf"))
        scores = torch.cat([scores, extra_scores], dim=-1)
        values.append(ev)
    probs = torch.softmax(scores, dim=-1)
    all_v = torch.cat(values, dim=3)  # (B, Hkv, L, K, D)
    streams = torch.einsum("bhslk,bhlkd->bhsld", probs, all_v)
    H = Hkv * (Qs // 2 if lam is not None else Qs)
    G = H // Hkv
    out = streams[:, :, :G].reshape(B, H, L, D)
    if lam is not None:
        out = out - lam.to(compute_dtype)[..., None] * streams[:, :, G:].reshape(B, H, L, D)
    if norm_weight is not None:
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(compute_dtype)[:, None]
    return out.transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Triton: custom ops (opaque to torch.compile, with fake implementations) and their autograd
# ---------------------------------------------------------------------------------------------
def _fwd_blocks(head_dim: int) -> tuple[int, int, int, int | None]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages or None for Triton's default) for the forward, timed inside the
    captured prefill by benchmarks/attention_forward_configs.py (H100, 2026-12-07): with the streams as rows, 8 warps
    for both head sizes, and two stages at head size 128 (2.24 against 2.59 ms a 32K prefill's forward)."""
    return (64, 64, 8, 2) if head_dim > 64 else (64, 64, 8, None)


# The forward's two streams as the rows of one tile (``diff_attention_triton._fwd_streams_as_rows``) rather than two
# tiles of BLOCK_M rows each: at 8 warps each warp group then holds one stream's rows, where the two-tile form lays
# the same 64 rows on both (sm_90, ptxas: no spill against 392 bytes), and one product a K/V tile serves both
# streams. Measured on an H100 (benchmarks/RESULTS.md): a 32K prefill's forward 4.70 -> 2.59 ms at head size 128.
# tests/kernels/test_diff_attention.py runs the layout not shipped as well.
STREAMS_AS_ROWS = True


_FWD_TUNING = [(64, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4), (64, 4, 4), (128, 8, 2)]  # (BLOCK_N, warps, stages)
_BWD_TUNING = [(64, 64, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 32, 4, 4)]  # (M, N, w, s)


@functools.cache
def _kernels() -> dict[str, Any]:
    """The kernels with their default block shapes, or autotuned over a few on a GPU when ``CODA_GQA_L_AUTOTUNE=1``
    (``dispatch.autotune``; the interpreter runs one shape). Tuning keys leave out the lengths: the first call of
    each kind picks the configuration."""
    from . import diff_attention_triton as kt

    if not autotune():
        return {"fwd": kt._fwd_kernel, "dkdv": kt._bwd_dkdv_main_kernel, "dq": kt._bwd_dq_kernel, "tuned": False}
    import triton

    # Tuning timings kept on disk beside Triton's compiled kernels, so that a later process (each `coda-db ask`,
    # a restarted server) does not tune again; Triton releases without the option tune in every process.
    on_disk = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    fwd = triton.autotune(
        [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in _FWD_TUNING],
        key=["HEAD_DIM", "DIFF", "BOUNDED", "HAS_EXTRAS", "PREC", "STREAMS_AS_ROWS", "ROTATE", "HALF"],
        **on_disk,
    )(kt._fwd_kernel)
    bwd_configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in _BWD_TUNING
    ]
    key = ["HEAD_DIM", "BOUNDED", "PREC"]
    dkdv = triton.autotune(bwd_configs, key=key, **on_disk)(kt._bwd_dkdv_main_kernel)
    dq = triton.autotune(bwd_configs, key=key + ["HAS_EXTRAS"], **on_disk)(kt._bwd_dq_kernel)
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq, "tuned": True}


def _precision(ref: Tensor) -> str:
    """``tl.dot``'s input precision: for float32 operands ``dispatch.float32_dots`` (``ieee`` by default, as exact
    as the float32 reference the tests compare with); bf16/fp16 operands ignore it."""
    return float32_dots() if ref.dtype == torch.float32 else "tf32"


def _placeholder(ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A pointer for an argument the kernel's flags leave unread (no streams stored, no extras, no lambda, no
    norm). Uninitialised: a filled one costs a kernel per call, a graph node per layer in a captured decode step."""
    return torch.empty(1, device=ref.device, dtype=dtype or ref.dtype)


@torch.library.custom_op("coda_gqa_l::diff_attn_fwd", mutates_args=())
def _diff_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor | None,
    extra_k: Tensor | None,
    extra_v: Tensor | None,
    extra_bias: Tensor | None,
    norm_weight: Tensor | None,
    pos: Tensor,
    k_offset: int,
    scale: float,
    eps: float,
    bounded: bool,
    window: int,
    seg: int,
    num_sink: int,
    store_streams: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight, pos, k_offset, scale, eps, bounded,
                    window, seg, num_sink, store_streams)  # fmt: skip


class Rotation(NamedTuple):
    """RoPE and the noise rotation the forward applies to the projection's queries (``ROTATE``): the chunk's
    ``cos, sin (L, Dh)`` and the heads' noise angles ``theta_cos, theta_sin (H, Dh)``, float32 and contiguous
    (``theta_*`` None without noise heads), and the pair layout (``half``: ``(i, i + Dh/2)``; ``interleaved``:
    ``(2i, 2i + 1)``)."""

    cos: Tensor
    sin: Tensor
    theta_cos: Tensor | None
    theta_sin: Tensor | None
    layout: RopeLayout


def _forward(
    q: Tensor, k: Tensor, v: Tensor, lam: Tensor | None, extra_k: Tensor | None, extra_v: Tensor | None,
    extra_bias: Tensor | None, norm_weight: Tensor | None, pos: Tensor, k_offset: int, scale: float, eps: float,
    bounded: bool, window: int, seg: int, num_sink: int, store_streams: bool, rotation: Rotation | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The forward kernel's launch: stacked queries ``q (B, Hkv, streams, L, Dh)``, or with ``rotation`` the
    projection's queries before RoPE, ``q (B, H, L, Dh)`` with any strides of unit last stride (read in place)."""
    k, v = k.contiguous(), v.contiguous()
    lam = lam.contiguous() if lam is not None else None
    diff = lam is not None
    if rotation is None:
        q = q.contiguous()
        B, Hkv, Qs, L, D = q.shape
        G = Qs // 2 if diff else Qs
        H = Hkv * G
        # Q's strides as the kernel reads them: batch, KV head, stream, token
        q_strides = tuple(q.stride()[:4])
    else:
        if q.stride(-1) != 1:
            q = q.contiguous()
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        # the KV head's first head, its heads (both streams' rows read head g), the token
        q_strides = (q.stride(0), G * q.stride(1), q.stride(1), q.stride(2))
    o = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    if store_streams:
        a = torch.empty_like(q)
        lse = torch.empty(B, Hkv, Qs, L, device=q.device, dtype=torch.float32)
    else:
        a = _placeholder(q).view(1, 1, 1, 1, 1)
        lse = _placeholder(q, torch.float32).view(1, 1, 1, 1)
    has_extras = extra_k is not None and extra_k.shape[3] > 0
    ek = extra_k.contiguous() if has_extras and extra_k is not None else _placeholder(q).view(1, 1, 1, 1, 1)
    ev = extra_v.contiguous() if has_extras and extra_v is not None else ek
    eb = (
        extra_bias.contiguous()
        if has_extras and extra_bias is not None
        else _placeholder(q, torch.float32).view(1, 1, 1, 1)
    )
    E = ek.shape[3] if has_extras else 0
    lam_t = lam if lam is not None else _placeholder(q, torch.float32).view(1, 1, 1)
    nw = norm_weight if norm_weight is not None else _placeholder(q)
    if L == 1 and not store_streams and split_decode() and rotation is None:  # a decode step: keys split over programs
        _decode_split(q, k, v, lam_t, ek, ev, eb, nw, pos, o, k_offset, E, H, G, scale, eps, bounded, window, seg,
                      num_sink, diff, norm_weight is not None)  # fmt: skip
        return o, a, lse
    block_m, block_n, warps, stages = _fwd_blocks(D)
    grid = (triton_cdiv(L + block_m - 1, block_m), B * H)
    kernels = _kernels()
    blocks: dict[str, int] = {}
    if not kernels["tuned"]:
        blocks = dict(BLOCK_N=block_n, num_warps=warps) | ({} if stages is None else {"num_stages": stages})
    rotate: dict[str, Any] = {}
    if rotation is not None:
        noise_cos = rotation.theta_cos if rotation.theta_cos is not None else rotation.cos
        noise_sin = rotation.theta_sin if rotation.theta_sin is not None else rotation.sin
        rotate = dict(COS=rotation.cos, SIN=rotation.sin, TCOS=noise_cos, TSIN=noise_sin, ROTATE=True,
                      HALF=rotation.layout == "half")  # fmt: skip
    launch(kernels["fwd"], grid,
        q, k, v, lam_t, ek, ev, eb, nw, pos,
        o, a, lse,
        *q_strides,
        *k.stride()[:3],
        *v.stride()[:3],
        *lam_t.stride()[:2],
        *ek.stride()[:4],
        *ev.stride()[:4],
        *eb.stride()[:3],
        o.stride(0), o.stride(1), o.stride(2),
        *a.stride()[:4],
        *lse.stride()[:3],
        L, k.shape[2], k_offset, E, H, G,
        scale * _LOG2E, eps,
        HEAD_DIM=D, BLOCK_D=tile_size(D), BLOCK_M=block_m, BLOCK_E=min(64, tile_size(E)),
        DIFF=diff, BOUNDED=bounded, WINDOW=window, SEG=seg, NUM_SINK=num_sink,
        HAS_EXTRAS=has_extras, NORM=norm_weight is not None, STORE_STREAMS=store_streams, PREC=_precision(q),
        STREAMS_AS_ROWS=STREAMS_AS_ROWS, **blocks, **rotate,
    )  # fmt: skip
    return o, a, lse


# a decode step's main keys are split into at most this many stretches (a stretch is whole BLOCK_N tiles): a full
# cache of 128K tokens gets 32 stretches of 64 tiles per head, a graph decoder's 256-token window four of one tile
_DECODE_MAIN_SPLITS = 32


def _decode_split(
    q: Tensor, k: Tensor, v: Tensor, lam: Tensor, ek: Tensor, ev: Tensor, eb: Tensor, nw: Tensor, pos: Tensor,
    o: Tensor, k_offset: int, E: int, H: int, G: int, scale: float, eps: float, bounded: bool, window: int, seg: int,
    num_sink: int, diff: bool, norm: bool,
) -> None:  # fmt: skip
    """One token per row (L == 1) into ``o``: the split forward and its combine (diff_attention_triton)."""
    from . import diff_attention_triton as kt

    B, _, _, _, D = q.shape
    LK = k.shape[2]
    block_n, block_d = 64, tile_size(D)
    block_e = min(64, tile_size(E)) if E else 16
    tiles = max(1, triton_cdiv(LK, block_n))  # no main keys at all: one empty stretch
    main_splits = min(tiles, _DECODE_MAIN_SPLITS)
    main_chunk = triton_cdiv(tiles, main_splits) * block_n
    main_splits = max(1, triton_cdiv(LK, main_chunk))
    splits = main_splits + (triton_cdiv(E, block_e) if E else 0)
    partial_m = torch.empty(B * H, 2, splits, device=q.device, dtype=torch.float32)
    partial_l = torch.empty_like(partial_m)
    partial_acc = torch.empty(B * H, 2, splits, block_d, device=q.device, dtype=torch.float32)
    launch(kt._decode_split_kernel, (B * (H // G), splits),
        q, k, v, ek, ev, eb, pos, partial_m, partial_l, partial_acc,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        ek.stride(0), ek.stride(1), ek.stride(3), ev.stride(0), ev.stride(1), ev.stride(3), eb.stride(0), eb.stride(1),
        LK, k_offset, E, H, G, main_splits, main_chunk, splits, scale * _LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=tile_size(G), BLOCK_N=block_n, BLOCK_E=block_e, DIFF=diff, BOUNDED=bounded,
        WINDOW=window, SEG=seg, NUM_SINK=num_sink, HAS_EXTRAS=E > 0, PREC=_precision(q), num_warps=4,
        **dependent_launch_meta(q.device),
    )  # fmt: skip
    launch(kt._decode_combine_kernel, (B * H,),
        partial_m, partial_l, partial_acc, lam, nw, o, lam.stride(0), lam.stride(1), o.stride(0), o.stride(2),
        splits, H, eps,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=tile_size(splits), DIFF=diff, NORM=norm, num_warps=1,
        **dependent_launch_meta(q.device),
    )  # fmt: skip


@_diff_attn_fwd.register_fake
def _diff_attn_fwd_fake(
    q: Tensor, k: Tensor, v: Tensor, lam: Tensor | None, *args: object
) -> tuple[Tensor, Tensor, Tensor]:
    store_streams = bool(args[-1])
    B, Hkv, Qs, L, D = q.shape
    H = Hkv * (Qs // 2 if lam is not None else Qs)
    o = q.new_empty(B, L, H, D)
    if store_streams:
        return o, torch.empty_like(q), q.new_empty(B, Hkv, Qs, L, dtype=torch.float32)
    return o, q.new_empty(1, 1, 1, 1, 1), q.new_empty(1, 1, 1, 1, dtype=torch.float32)


@torch.library.custom_op("coda_gqa_l::diff_attn_bwd", mutates_args=())
def _diff_attn_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    extra_k: Tensor | None,
    extra_v: Tensor | None,
    extra_bias: Tensor | None,
    pos: Tensor,
    d_streams: Tensor,
    lse: Tensor,
    delta: Tensor,
    k_offset: int,
    scale: float,
    bounded: bool,
    window: int,
    seg: int,
    num_sink: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .diff_attention_triton import _bwd_extras_kernel

    B, Hkv, Qs, L, D = q.shape
    LK = k.shape[2]
    q, k, v, d_streams = q.contiguous(), k.contiguous(), v.contiguous(), d_streams.contiguous()
    lse, delta = lse.contiguous(), delta.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    block_d = tile_size(D)
    warps = 8 if D > 64 else 4
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, SEG=seg, NUM_SINK=num_sink, PREC=_precision(q))
    window_args = dict(BOUNDED=bounded, WINDOW=window)
    kernels = _kernels()
    tiles = dict(BLOCK_M=64, BLOCK_N=64, num_warps=warps) if not kernels["tuned"] else {}
    launch(kernels["dkdv"], lambda meta: (triton_cdiv(LK, meta["BLOCK_N"]), B * Hkv),
        q, k, v, d_streams, lse, delta, pos, dk, dv,
        *q.stride()[:4], *k.stride()[:3], *v.stride()[:3], *d_streams.stride()[:4], *lse.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3],
        L, LK, k_offset, Hkv, Qs, scale * _LOG2E, scale,
        **tiles, **common, **window_args,
    )  # fmt: skip
    has_extras = extra_k is not None and extra_v is not None and extra_bias is not None and extra_k.shape[3] > 0
    if has_extras:
        assert extra_k is not None and extra_v is not None and extra_bias is not None
        ek, ev, eb = extra_k.contiguous(), extra_v.contiguous(), extra_bias.contiguous()
        dek, dev, deb = torch.empty_like(ek), torch.empty_like(ev), torch.empty_like(eb)
        nseg, E = ek.shape[2], ek.shape[3]
        block_e = min(64, tile_size(E))
        e_tiles = triton_cdiv(E, block_e)
        launch(_bwd_extras_kernel, (nseg * e_tiles, B * Hkv),
            q, ek, ev, eb, d_streams, lse, delta, pos, dek, dev, deb,
            *q.stride()[:4], *ek.stride()[:4], *ev.stride()[:4], *eb.stride()[:3], *d_streams.stride()[:4],
            *lse.stride()[:3],
            L, E, Hkv, Qs, e_tiles, scale * _LOG2E, scale,
            BLOCK_M=64 if seg >= 64 else 16, BLOCK_E=block_e, **common, num_warps=warps,
        )  # fmt: skip
    else:
        ek = ev = _placeholder(q).view(1, 1, 1, 1, 1)
        eb = _placeholder(q, torch.float32).view(1, 1, 1, 1)
        dek, dev, deb = torch.empty_like(ek), torch.empty_like(ev), torch.empty_like(eb)
        E = 0
        block_e = 16
    launch(kernels["dq"], lambda meta: (triton_cdiv(L + meta["BLOCK_M"] - 1, meta["BLOCK_M"]), B * Hkv * Qs),
        q, k, v, ek, ev, eb, d_streams, lse, delta, pos, dq,
        *q.stride()[:4], *k.stride()[:3], *v.stride()[:3], *ek.stride()[:4], *ev.stride()[:4], *eb.stride()[:3],
        *d_streams.stride()[:4], *lse.stride()[:3],
        L, LK, k_offset, E, Hkv, Qs, scale * _LOG2E, scale,
        BLOCK_E=block_e, HAS_EXTRAS=has_extras, **tiles, **common, **window_args,
    )  # fmt: skip
    return dq, dk, dv, dek, dev, deb


@_diff_attn_bwd.register_fake
def _diff_attn_bwd_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    extra_k: Tensor | None,
    extra_v: Tensor | None,
    extra_bias: Tensor | None,
    *args: object,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    def like(x: Tensor | None) -> Tensor:
        return torch.empty_like(x) if x is not None else q.new_empty(1)

    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(extra_k), like(extra_v), like(extra_bias)


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    (q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight, pos, k_offset, scale, eps, bounded, window, seg,
     num_sink, store_streams) = inputs  # fmt: skip
    _, streams, lse = output
    ctx.save_for_backward(q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight, pos, streams, lse)
    ctx.params = (k_offset, scale, eps, bounded, window, seg, num_sink)


def _backward(ctx, grad_out, _grad_streams, _grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight, pos, streams, lse = ctx.saved_tensors
    k_offset, scale, eps, bounded, window, seg, num_sink = ctx.params
    if streams.dim() != 5 or streams.shape != q.shape:
        raise RuntimeError("differential_attention: backward needs the forward run with gradients enabled")
    B, Hkv, Qs, L, D = q.shape
    G = Qs // 2 if lam is not None else Qs
    H = Hkv * G
    # The epilogue's backward in PyTorch (elementwise, float32): norm, then the combine.
    d_out = grad_out.float().transpose(1, 2)  # (B, H, L, D)
    a_sig = streams[:, :, :G].reshape(B, H, L, D).float()
    combined = a_sig
    if lam is not None:
        a_noi = streams[:, :, G:].reshape(B, H, L, D).float()
        combined = a_sig - lam[..., None] * a_noi
    d_norm_weight = None
    if norm_weight is not None:
        rstd = torch.rsqrt(combined.pow(2).mean(-1, keepdim=True) + eps)
        normed = combined * rstd
        d_norm_weight = (d_out * normed).sum(dim=(0, 2)).to(norm_weight.dtype)
        gy = d_out * norm_weight.float()[:, None]
        d_comb = rstd * (gy - normed * (gy * normed).mean(-1, keepdim=True))
    else:
        d_comb = d_out
    d_lam = None
    d_sig = d_comb
    delta_sig = (d_sig * a_sig).sum(-1)
    if lam is not None:
        d_noi = -lam[..., None] * d_comb
        d_lam = -(d_comb * a_noi).sum(-1)
        d_streams = torch.stack([d_sig.view(B, Hkv, G, L, D), d_noi.view(B, Hkv, G, L, D)], dim=2)
        d_streams = d_streams.view(B, Hkv, Qs, L, D)
        delta = torch.stack([delta_sig.view(B, Hkv, G, L), (d_noi * a_noi).sum(-1).view(B, Hkv, G, L)], dim=2)
        delta = delta.view(B, Hkv, Qs, L)
    else:
        d_streams = d_sig.view(B, Hkv, Qs, L, D)
        delta = delta_sig.view(B, Hkv, Qs, L)
    dq, dk, dv, dek, dev, deb = _diff_attn_bwd(
        q, k, v, extra_k, extra_v, extra_bias, pos, d_streams.to(q.dtype), lse, delta.contiguous(),
        k_offset, scale, bounded, window, seg, num_sink,
    )  # fmt: skip
    has_extras = extra_k is not None
    return (
        dq, dk, dv, d_lam,
        dek if has_extras else None, dev if has_extras else None, deb if has_extras else None,
        d_norm_weight, None, None, None, None, None, None, None, None, None,
    )  # fmt: skip


_diff_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor | None,
    *,
    q_start: int | Tensor,
    k_offset: int,
    scale: float,
    pattern: Pattern = CAUSAL,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    extra_bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Differential attention of the stacked problem (module docstring), Triton or reference.

    ``q_start`` may be a 0-d int64 tensor on the device (CUDA-graph capture); the reference
    then reads it with a host synchronisation.
    """
    _check(q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight)
    # any input that wants a gradient sends the call through the backward kernels, which take plain offsets only
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight)
    )
    if k_offset == SEGMENT_WINDOW:
        if not pattern.bounded:
            raise ValueError("k_offset=SEGMENT_WINDOW needs the bounded pattern (a segment's window)")
        if needs_grad:
            raise ValueError("k_offset=SEGMENT_WINDOW is for inference: the backward kernels take offsets only")
    elif k_offset == KEYS_FROM_ZERO:
        if needs_grad:
            raise ValueError("k_offset=KEYS_FROM_ZERO is for inference: the backward kernels take offsets only")
    elif k_offset < 0:
        raise ValueError(f"k_offset must be >= 0, SEGMENT_WINDOW or KEYS_FROM_ZERO, got {k_offset}")
    if use_triton(q.device):
        # torch.full writes the position with a kernel; torch.tensor would copy it from the host and wait for the
        # stream to drain first (a synchronisation per layer and chunk)
        pos = q_start if isinstance(q_start, Tensor) else torch.full((), q_start, device=q.device, dtype=torch.int64)
        o, _, _ = _diff_attn_fwd(
            q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight, pos, k_offset, scale, eps,
            pattern.bounded, pattern.window, pattern.segment, pattern.num_sink, needs_grad,
        )  # fmt: skip
        return o
    start = int(q_start) if isinstance(q_start, Tensor) else q_start
    if k_offset == SEGMENT_WINDOW:
        S = pattern.segment
        k_offset = start - ((start // S) * S - pattern.window + S)
    elif k_offset == KEYS_FROM_ZERO:
        k_offset = start
    return reference_attention(
        q, k, v, lam, q_start=start, k_offset=k_offset, scale=scale, pattern=pattern,
        extra_k=extra_k, extra_v=extra_v, extra_bias=extra_bias, norm_weight=norm_weight, eps=eps,
    )  # fmt: skip


# RoPE and the noise rotation in the forward's prologue (``Rotation``, ``rotated_fused_attention``) rather than one
# stacking pass before it: on an H100 the stacking kernel took 0.49 ms of a 7B layer's 32K captured prefill (15 us a
# 2,048-token piece; it writes the stacked queries, which the forward reads back). Measured on an H100 (2026-12-07,
# benchmarks/captured_prefill.py): the 7B captured prefill 1.258 -> 1.171 ms at 2K, 11.28 -> 11.10 ms at 32K.
ROTATE_IN_FORWARD = True


def rotation_in_forward(q: Tensor, k_offset: int) -> bool:
    """Whether ``rotated_fused_attention`` rotates in the forward's prologue for these queries ``(B, H, L, Dh)``:
    the Triton path with the streams-as-rows layout, a chunk (not a one-token step, which splits its keys), no
    gradient, outside ``torch.compile``'s tracing, and ``ROTATE_IN_FORWARD`` on."""
    return (
        ROTATE_IN_FORWARD
        and STREAMS_AS_ROWS
        and use_triton(q.device)
        and q.shape[2] > 1
        and k_offset >= 0
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def rotated_fused_attention(
    q: Tensor,
    rotation: Rotation,
    num_kv_heads: int,
    k: Tensor,
    v: Tensor,
    lam: Tensor | None,
    *,
    q_start: int | Tensor,
    k_offset: int,
    scale: float,
    pattern: Pattern = CAUSAL,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    extra_bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """``fused_attention`` of the projection's queries ``q (B, H, L, Dh)`` before RoPE (inference): rotated in the
    forward's prologue where ``rotation_in_forward`` says so, else stacked by ``rope.stack_rotated_queries`` first.
    The noise heads exist where ``rotation.theta_cos`` does (``lam`` given)."""
    from .rope import stack_rotated_queries

    if (rotation.theta_cos is None or rotation.theta_sin is None) != (lam is None):
        raise ValueError("noise heads need both lam and the noise angles (rotation.theta_cos/theta_sin), or neither")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight)
    ):
        raise ValueError("rotated_fused_attention is for inference: with gradients use rope.rotate_and_stack and "
                         "fused_attention")  # fmt: skip
    if q.dim() != 4:
        raise ValueError(f"q must be the projected queries (B, H, L, Dh), got shape {tuple(q.shape)}")
    if not rotation_in_forward(q, k_offset):
        stacked = stack_rotated_queries(
            q, rotation.cos, rotation.sin, rotation.theta_cos, rotation.theta_sin, num_kv_heads, rotation.layout
        )
        return fused_attention(
            stacked, k, v, lam, q_start=q_start, k_offset=k_offset, scale=scale, pattern=pattern, extra_k=extra_k,
            extra_v=extra_v, extra_bias=extra_bias, norm_weight=norm_weight, eps=eps,
        )  # fmt: skip
    B, H, L, D = q.shape
    if H % num_kv_heads or k.shape[1] != num_kv_heads:
        raise ValueError(f"{H} query heads do not group over the keys' {k.shape[1]} heads ({num_kv_heads=})")
    streams = (2 if lam is not None else 1) * (H // num_kv_heads)
    # the stacked queries' shape without their values (a view of stride 0), for the checks the stacked path makes
    _check(q.as_strided((B, num_kv_heads, streams, L, D), (0,) * 5), k, v, lam, extra_k, extra_v, extra_bias,
           norm_weight)  # fmt: skip
    for name, table, rows in zip(Rotation._fields[:4], rotation[:4], (L, L, H, H), strict=True):
        if table is None:
            continue
        if table.shape != (rows, D) or table.dtype != torch.float32 or not table.is_contiguous():
            raise ValueError(f"rotation.{name} must be a contiguous float32 ({rows}, {D}) tensor, got {table.dtype} "
                             f"{tuple(table.shape)}")  # fmt: skip
    pos = q_start if isinstance(q_start, Tensor) else torch.full((), q_start, device=q.device, dtype=torch.int64)
    o, _, _ = _forward(
        q, k, v, lam, extra_k, extra_v, extra_bias, norm_weight, pos, k_offset, scale, eps, pattern.bounded,
        pattern.window, pattern.segment, pattern.num_sink, False, rotation,
    )  # fmt: skip
    return o


def differential_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor | None,
    *,
    scale: float,
    head_norm_weight: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Plain causal differential attention of a whole sequence: ``q (B, Hkv, Q, L, Dh)`` over
    ``k, v (B, Hkv, L, Dh)`` -> ``(B, L, H, Dh)``; differentiable and ``torch.compile``-able."""
    return fused_attention(
        q, k, v, lam, q_start=0, k_offset=k.shape[2] - q.shape[3], scale=scale, norm_weight=head_norm_weight, eps=eps
    )


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor | None,
    extra_k: Tensor | None,
    extra_v: Tensor | None,
    extra_bias: Tensor | None,
    norm_weight: Tensor | None,
) -> None:
    if q.dim() != 5:
        raise ValueError(f"q must be (B, Hkv, streams, L, Dh), got shape {tuple(q.shape)}")
    B, Hkv, Qs, L, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != Hkv or t.shape[3] != D:
            raise ValueError(f"{name} must be (B={B}, Hkv={Hkv}, LK, Dh={D}), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, q has {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if lam is not None:
        if Qs % 2:
            raise ValueError(f"differential attention needs an even number of stacked streams, got {Qs}")
        if lam.shape != (B, Hkv * Qs // 2, L):
            raise ValueError(f"lam must be (B, H, L) = {(B, Hkv * Qs // 2, L)}, got {tuple(lam.shape)}")
    if extra_k is not None:
        if extra_v is None or extra_bias is None:
            raise ValueError("extra_k, extra_v and extra_bias come together")
        if extra_k.shape != extra_v.shape or extra_k.shape[:2] != (B, Hkv) or extra_k.shape[4] != D:
            raise ValueError(f"extra_k/extra_v must be (B, Hkv, nseg, E, Dh), got {tuple(extra_k.shape)}")
        if extra_bias.shape != extra_k.shape[:4] or extra_bias.dtype != torch.float32:
            raise ValueError(f"extra_bias must be float32 {tuple(extra_k.shape[:4])}, got {tuple(extra_bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (Hkv * (Qs // 2 if lam is not None else Qs), D):
        raise ValueError(f"norm_weight has shape {tuple(norm_weight.shape)}, expected (H, Dh)")
