"""Fused bank routing (docs/kernels.md): the wrapper around the Triton kernel in ``routing_triton.py``.

``route_chunk_triton`` returns what ``routing_reference.route_chunk`` returns (the banks after a prefill
chunk and the snapshot each of its segments sees) from one launch, with every routing decision
identical to the reference's whenever the reference's scores stay clear of float32 rounding
(the tests check inputs whose ``min_margin`` is at least 1e-4). It is an inference kernel: no
autograd, no metrics (``route_chunk`` keeps those), and no host synchronisation, so a decode
step that routes can be captured in a CUDA graph and replayed at later positions by passing the
position as the device tensor ``start_dev``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import BoundedConfig, chunk_segments
from ..state import Banks
from . import dispatch
from .dispatch import interpreting, launch, tile_size

# One program per (batch, KV head, bank) runs every segment in sequence, so a program is all the
# parallelism there is: 8 warps keep a 64x64 tile at 16 values a thread and the whole state in
# registers without spilling (4 spill at the 7B layer shape, 16 cap registers at 128 and spill).
_WARPS = 8
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def routing_programs(batch: int, kv_heads: int, followers: bool | None = None) -> int:
    """Programs one ``route_chunk_triton`` launch runs at once, each on a multiprocessor of its own for the whole
    chunk: two chains (exact, summary) per (batch row, KV head), and two key followers each where they run
    (``followers`` None: as ``dispatch.routing_key_followers`` says)."""
    if followers is None:
        followers = dispatch.routing_key_followers()
    return batch * kv_heads * (4 if followers else 2)


def route_chunk_triton(
    banks: Banks,
    ext_k: Tensor,
    ext_v: Tensor,
    ext_g: Tensor,
    *,
    start: int,
    n: int,
    eta: Tensor,
    config: BoundedConfig,
    start_dev: Tensor | None = None,
    out: Banks | None = None,
    snapshots: tuple[Tensor, Tensor, Tensor] | None = None,
    num_warps: int | None = None,
    write_keys: bool = True,
    phase_stamps: Tensor | None = None,
) -> tuple[Banks, Tensor, Tensor, Tensor]:
    """``routing_reference.route_chunk`` in one Triton launch (arguments and results as there).

    Args:
        start_dev: optional 0-d int64 tensor on the device holding ``start``; the kernel reads
            the position from it, so a captured launch stays right when replayed later. ``start``
            still fixes the number of snapshots (``len(chunk_segments(start, n, S))``), which
            must be the same for the value in ``start_dev``. Without it ``start`` is written into
            a device scalar by a fill (no host-to-device copy): one binary for both paths, so a
            fresh process compiles the kernel once (with the attention forward its largest compile: about
            2.5 of 9.6 s for the database's first request, sm_90 on a 2-core CPU, benchmarks/kernel_compiles.py).

        out: contiguous tensors shaped as ``banks``' to write the new banks into (returned as the new banks), which
            may be ``banks`` itself: each program reads its input bank before the segment loop and writes its result
            after it (a graph step routes the state's banks in place, with no copies after). Without it the inputs
            are left untouched and the returned banks are new tensors.
        snapshots: ``routing_snapshots(banks, segments)`` to write the snapshots into (returned as they are): a caller
            launching the kernel on a side stream allocates them on its own stream, which reads them.
        num_warps: warps per program, ``_WARPS`` when None (benchmarks/routing_kernel.py and captured_prefill.py time
            the choices; results do not depend on it).
        write_keys: ``False`` leaves the key rows of the snapshots and the new banks unwritten (wrong results):
            benchmarks/routing_kernel.py times the chain without them, the bound on moving them to another pass.
        phase_stamps: ``phase_stamp_buffer(B * Hkv, segments)``: each program writes its multiprocessor's cycle
            counter at the end of each phase of each segment there (benchmarks/routing_phases.py; zeros in Triton's
            interpreter). Results do not depend on it.
    """
    _check(banks, ext_k, ext_v, ext_g, eta, n, config, start_dev)
    B, Hkv, ext_len, Dh = ext_k.shape
    Me, Ms = banks.ex_k.shape[2], banks.sm_k.shape[2]
    nseg = len(chunk_segments(start, n, config.segment))
    dtype, device = banks.ex_k.dtype, ext_k.device
    if out is None:
        out = Banks(*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in banks))
    else:
        for name, dst, src in zip(Banks._fields, out, banks, strict=True):
            if dst.shape != src.shape or dst.dtype != src.dtype or not dst.is_contiguous():
                raise ValueError(f"out.{name} must be a contiguous {src.dtype} tensor of shape {tuple(src.shape)}")
        if any(not src.is_contiguous() for src in banks):  # an input copy would not alias the output
            raise ValueError("routing in place needs contiguous banks")
    if snapshots is None:
        snap_k, snap_v, snap_b = routing_snapshots(banks, nseg)
    else:
        snap_k, snap_v, snap_b = snapshots
        expected = routing_snapshots(banks, nseg, allocate=False)
        for name, given, want in zip(("keys", "values", "biases"), snapshots, expected, strict=True):
            if given.shape != want.shape or given.dtype != want.dtype or not given.is_contiguous():
                raise ValueError(
                    f"snapshot {name} must be a contiguous {want.dtype} tensor of shape {tuple(want.shape)}, "
                    f"got {given.dtype} {tuple(given.shape)}"
                )
    if nseg == 0 or Me + Ms == 0:
        for dst, src in zip(out, banks, strict=True):
            if dst is not src:
                dst.copy_(src)
        return out, snap_k, snap_v, snap_b

    from .routing_triton import _route_chunk_kernel

    c = _contiguous
    if start_dev is None:
        start_dev = torch.full((), start, dtype=torch.int64, device=device)
    block_d = tile_size(Dh)
    # 16-bit tokens and banks: tensor-core dots with exact products; float32: FMA dots over short chunks.
    # Triton's interpreter multiplies 16-bit floats as raw bits, so it takes the float32 path.
    lowp = ext_k.dtype == ext_v.dtype == dtype and dtype in _LOW_PRECISION and not interpreting()
    cos_bk, ema_bk = (min(block_d, 128), min(block_d, 64)) if lowp else (min(block_d, 32), 16)
    block_s, block_me, block_ms = tile_size(config.segment), tile_size(Me), tile_size(Ms)
    followers = write_keys and dispatch.routing_key_followers()
    if followers:  # each chain's published decisions, and how many segments it has published (from zero)
        rows = B * Hkv
        dec_ex = torch.empty(rows * nseg * block_me, dtype=torch.int32, device=device)
        dec_sm_i = torch.empty(rows * nseg * (block_s + 2 * block_ms), dtype=torch.int32, device=device)
        dec_sm_f = torch.empty(rows * nseg * block_ms, dtype=torch.float32, device=device)
        flags = torch.zeros(rows * 2, dtype=torch.int32, device=device)
    else:
        dec_ex = dec_sm_i = flags = torch.empty(1, dtype=torch.int32, device=device)
        dec_sm_f = torch.empty(1, dtype=torch.float32, device=device)
    if phase_stamps is not None:
        want = phase_stamp_buffer(B * Hkv, nseg, device=torch.device("meta"))
        if phase_stamps.shape != want.shape or phase_stamps.dtype != want.dtype or not phase_stamps.is_contiguous():
            raise ValueError(f"phase_stamps must be a contiguous int64 tensor of shape {tuple(want.shape)}")
    stamps = phase_stamps if phase_stamps is not None else flags
    launch(_route_chunk_kernel, (B * Hkv, routing_programs(1, 1, followers)),
        c(ext_k), c(ext_v), c(ext_g), c(eta),
        c(banks.ex_k), c(banks.ex_v), c(banks.ex_g), c(banks.ex_last), _bytes(banks.ex_filled),
        c(banks.sm_k), c(banks.sm_v), c(banks.sm_g), _bytes(banks.sm_filled),
        out.ex_k, out.ex_v, out.ex_g, out.ex_last, _bytes(out.ex_filled),
        out.sm_k, out.sm_v, out.sm_g, _bytes(out.sm_filled),
        snap_k, snap_v, snap_b, dec_ex, dec_sm_i, dec_sm_f, flags, stamps,
        start_dev, nseg, ext_len, Hkv,
        config.tau_exact, config.tau_summary, config.novelty, config.match,
        DH=Dh, ME=Me, MS=Ms, SEG=config.segment, WINDOW=config.window, NUM_SINK=config.num_sink,
        MAX_INSERTS=config.max_inserts,
        BLOCK_S=block_s, BLOCK_ME=block_me, BLOCK_MS=block_ms, BLOCK_D=tile_size(Dh),
        COS_BK=cos_bk, EMA_BK=ema_bk, LOWP=lowp, INTERPRET=interpreting(), WRITE_K=write_keys,
        KEY_FOLLOWERS=followers, PHASES=phase_stamps is not None, num_warps=_WARPS if num_warps is None else num_warps,
    )  # fmt: skip
    return out, snap_k, snap_v, snap_b


PHASE_SLOTS = 8  # routing_triton.PHASE_SLOTS


def phase_stamp_buffer(rows: int, segments: int, device: torch.device | str = "cpu") -> Tensor:
    """Room for ``route_chunk_triton(phase_stamps=...)``: ``(rows, 4 programs, segments, PHASE_SLOTS)`` int64, the
    programs being the exact chain, the summary chain and their key followers; slot ``k`` of a segment is the cycle
    counter at the end of its phase ``k`` (routing_triton: the exact chain stamps 0-4, the summary chain 0-5, the
    followers 0-2), unwritten slots zero."""
    return torch.zeros(rows, 4, segments, PHASE_SLOTS, dtype=torch.int64, device=device)


def routing_snapshots(banks: Banks, segments: int, *, allocate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised ``(keys, values, logit biases)`` for the banks as each of ``segments`` segments sees them:
    ``(B, Hkv, segments, Me + Ms, Dh)`` in the banks' dtype twice, then ``(B, Hkv, segments, Me + Ms)`` float32.
    ``allocate=False`` gives meta tensors of those shapes (for checks)."""
    B, Hkv, Me, Dh = banks.ex_k.shape
    slots = Me + banks.sm_k.shape[2]
    device = banks.ex_k.device if allocate else torch.device("meta")
    keys = torch.empty(B, Hkv, segments, slots, Dh, dtype=banks.ex_k.dtype, device=device)
    return keys, torch.empty_like(keys), torch.empty(B, Hkv, segments, slots, dtype=torch.float32, device=device)


def _contiguous(t: Tensor) -> Tensor:
    return t.contiguous()


def _bytes(t: Tensor) -> Tensor:
    """Bool masks as uint8: one byte per flag, the same memory, no conversion kernel."""
    return t.contiguous().view(torch.uint8)


def _check(
    banks: Banks,
    ext_k: Tensor,
    ext_v: Tensor,
    ext_g: Tensor,
    eta: Tensor,
    n: int,
    config: BoundedConfig,
    start_dev: Tensor | None,
) -> None:
    """Shapes, dtypes, devices; refuse autograd (the kernel writes values with no history)."""
    named = dict(zip(Banks._fields, banks, strict=True), ext_k=ext_k, ext_v=ext_v, ext_g=ext_g, eta=eta)
    if start_dev is not None:
        named["start_dev"] = start_dev
    grads = [name for name, t in named.items() if t.requires_grad]
    if grads:
        raise RuntimeError(
            f"route_chunk_triton is inference only, but {grads} require grad; "
            "use kernels.routing_reference.route_chunk for training or run under torch.no_grad()"
        )
    if ext_k.dim() != 4 or ext_v.shape != ext_k.shape:
        raise ValueError(f"ext_k and ext_v must both be (B, Hkv, W + n, Dh), got {ext_k.shape} and {ext_v.shape}")
    B, Hkv, ext_len, Dh = ext_k.shape
    if ext_len != config.window + n:
        raise ValueError(f"ext_k holds {ext_len} tokens, expected W + n = {config.window} + {n}")
    if ext_g.shape != (B, Hkv, ext_len) or ext_g.dtype != torch.float32:
        raise ValueError(f"ext_g must be float32 of shape {(B, Hkv, ext_len)}, got {ext_g.dtype} {tuple(ext_g.shape)}")
    if eta.shape != (Hkv,):
        raise ValueError(f"eta must have shape ({Hkv},), got {tuple(eta.shape)}")
    for name, t in zip(Banks._fields, banks, strict=True):
        if t.shape[:2] != (B, Hkv) or (t.dim() == 4 and t.shape[3] != Dh):
            raise ValueError(f"bank {name} has shape {tuple(t.shape)}, not matching ext_k {tuple(ext_k.shape)}")
    if banks.ex_k.dtype != banks.sm_k.dtype or {banks.ex_v.dtype, banks.sm_v.dtype} != {banks.ex_k.dtype}:
        raise TypeError("exact and summary bank keys and values must share one dtype")
    if start_dev is not None and (start_dev.dim() != 0 or start_dev.dtype != torch.int64):
        raise ValueError(f"start_dev must be a 0-d int64 tensor, got {start_dev.dtype} {tuple(start_dev.shape)}")
    kinds = {"ex_g": torch.float32, "sm_g": torch.float32, "ex_last": torch.int64}
    kinds.update(ex_filled=torch.bool, sm_filled=torch.bool)
    for name, kind in kinds.items():
        if getattr(banks, name).dtype != kind:
            raise TypeError(f"bank {name} must be {kind}, got {getattr(banks, name).dtype}")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
