"""``BoundedState``: the fixed-size inference state of one bounded attention layer.

Every tensor has a size fixed by the configuration; nothing grows with the tokens seen.
Shapes (``B`` batch, ``Hkv`` KV heads, ``Dh`` head size, ``Ns`` sinks, ``W`` window,
``Me``/``Ms`` exact/summary slots):

=============  ======================  =======  ==============================================
name           shape                   dtype    meaning
=============  ======================  =======  ==============================================
sink_k/v       (B, Hkv, Ns, Dh)        model    keys/values of tokens ``0..Ns-1``
win_k/v        (B, Hkv, W, Dh)         model    ring: token ``j`` lives in slot ``j % W``
win_g          (B, Hkv, W)             float32  write gate of each window token
ex_k/v         (B, Hkv, Me, Dh)        model    exact landmark bank
ex_g           (B, Hkv, Me)            float32  gate of the stored token (logit offset log g)
ex_last        (B, Hkv, Me)            int64    last use (token index), for LRU
ex_filled      (B, Hkv, Me)            bool     slot holds a token
sm_k/v         (B, Hkv, Ms, Dh)        model    summary prototypes (EMA of routed tokens)
sm_g           (B, Hkv, Ms)            float32  EMA of the members' gates
sm_filled      (B, Hkv, Ms)            bool     prototype seeded
position       (B,)                    int64    tokens seen, per row (all rows equal here)
=============  ======================  =======  ==============================================

Keys are stored before RoPE in ``relative`` position mode and after it in ``absolute`` mode.
Which window slots are valid, and which token each holds, follows from ``pos`` alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .config import BoundedConfig

TENSOR_FIELDS: tuple[str, ...] = (
    "sink_k",
    "sink_v",
    "win_k",
    "win_v",
    "win_g",
    "ex_k",
    "ex_v",
    "ex_g",
    "ex_last",
    "ex_filled",
    "sm_k",
    "sm_v",
    "sm_g",
    "sm_filled",
    "position",
)


class Banks(NamedTuple):
    """Bank tensors of a state (shapes in the module docstring)."""

    ex_k: Tensor
    ex_v: Tensor
    ex_g: Tensor
    ex_last: Tensor
    ex_filled: Tensor
    sm_k: Tensor
    sm_v: Tensor
    sm_g: Tensor
    sm_filled: Tensor


BANK_FIELDS: tuple[str, ...] = Banks._fields


def merge_metrics(target: dict[str, float], counts: dict[str, float]) -> None:
    """Add routing counts into ``target``; ``min_margin`` keeps the smallest value seen."""
    for key, value in counts.items():
        if key == "min_margin":
            target[key] = min(target.get(key, float("inf")), value)
        else:
            target[key] = target.get(key, 0.0) + value


@dataclass
class BoundedState:
    """The state of one bounded layer (see the module docstring for every field).

    ``prefill_chunked`` and ``step`` update it in place (its fields are rebound to new tensors,
    so a ``clone()`` never sees the change) and return it.
    """

    config: BoundedConfig
    sink_k: Tensor
    sink_v: Tensor
    win_k: Tensor
    win_v: Tensor
    win_g: Tensor
    ex_k: Tensor
    ex_v: Tensor
    ex_g: Tensor
    ex_last: Tensor
    ex_filled: Tensor
    sm_k: Tensor
    sm_v: Tensor
    sm_g: Tensor
    sm_filled: Tensor
    position: Tensor
    pos: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # derived, never saved: the reference path's per-segment decode block (decode_view.py); a
    # copy of the state rebuilds its own
    decode_view: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def empty(
        cls,
        config: BoundedConfig,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> BoundedState:
        """A fresh state: zeros, empty banks, position 0."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"state dtype must be a floating point type, got {dtype}")
        lead = (batch_size, num_kv_heads)

        # on CUDA with ONE_LAUNCH_STATE_COPIES uninitialised here and zeroed all at once below: one launch instead of
        # one a field (a fresh state is part of every prefill from the start, where the host's launches are the GPU's
        # idle time)
        one_launch = _one_launch(torch.device(device))
        make = torch.empty if one_launch else torch.zeros

        def unset(*shape: int, dt: torch.dtype = dtype) -> Tensor:
            return make(*lead, *shape, device=device, dtype=dt)

        ns, w, me, ms, d = (
            config.num_sink,
            config.window,
            config.num_landmarks_exact,
            config.num_landmarks_summary,
            head_dim,
        )
        state = cls(
            config=config,
            sink_k=unset(ns, d),
            sink_v=unset(ns, d),
            win_k=unset(w, d),
            win_v=unset(w, d),
            win_g=unset(w, dt=torch.float32),
            ex_k=unset(me, d),
            ex_v=unset(me, d),
            ex_g=unset(me, dt=torch.float32),
            ex_last=unset(me, dt=torch.int64),
            ex_filled=unset(me, dt=torch.bool),
            sm_k=unset(ms, d),
            sm_v=unset(ms, d),
            sm_g=unset(ms, dt=torch.float32),
            sm_filled=unset(ms, dt=torch.bool),
            position=make(batch_size, device=device, dtype=torch.int64),
        )
        if one_launch:
            zero_tensors(list(state.tensors().values()))
        return state

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the state, by field name."""
        return {name: getattr(self, name) for name in TENSOR_FIELDS}

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (what ``cache_bytes`` reports)."""
        return sum(t.nbytes for t in self.tensors().values())

    @property
    def batch_size(self) -> int:
        return int(self.win_k.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.win_k.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.win_k.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.win_k.dtype

    @property
    def device(self) -> torch.device:
        return self.win_k.device

    def clone(self) -> BoundedState:
        """An independent copy (fork): for concurrent questions and CUDA graph buffers."""
        copies: dict[str, Any] = {name: t.clone() for name, t in self.tensors().items()}
        return dataclasses.replace(self, **copies, metrics=dict(self.metrics), decode_view=None)

    def detach(self) -> BoundedState:
        """The same state cut from the autograd graph (truncated backpropagation)."""
        detached: dict[str, Any] = {n: t.detach() for n, t in self.tensors().items()}
        return dataclasses.replace(self, **detached, metrics=dict(self.metrics), decode_view=None)

    def to(self, device: torch.device | str) -> BoundedState:
        moved: dict[str, Any] = {n: t.to(device) for n, t in self.tensors().items()}
        return dataclasses.replace(self, **moved, metrics=dict(self.metrics), decode_view=None)

    def replace(self, **changes: Any) -> BoundedState:
        return dataclasses.replace(self, **changes)

    def add_metrics(self, counts: dict[str, float]) -> None:
        merge_metrics(self.metrics, counts)

    def fill_ratios(self) -> dict[str, float]:
        """Fraction of exact and summary slots in use, over the batch and heads."""
        ratios = {}
        if self.ex_filled.numel():
            ratios["exact_fill"] = float(self.ex_filled.float().mean())
        if self.sm_filled.numel():
            ratios["summary_fill"] = float(self.sm_filled.float().mean())
        return ratios


# Copies and zeroing of a state's tensors of every dtype as byte views in one multi-tensor launch, and a fresh state
# zeroed by one launch (``copy_tensors``, ``zero_tensors``, ``BoundedState.empty``): the captured prefill's 13 + 4 + 4
# launches around its graph become 1 + 1 + 1. On an H200 (2026-12-07, benchmarks/results/speed.md) a 7B layer's 2K
# captured prefill took 0.993 ms with it against 1.022 without (from ``init_state``; 0.803 against 0.838 from no
# state), its GPU tests passing. Off: each dtype's tensors go as one launch, a fresh state's fields zeroed one by one.
# CUDA only: on the CPU there is no launch to save (the database's demo ingest took 12.9-13.9 s either way in
# alternating runs on the 2-core machine, 2026-12-07: no difference beyond its noise), so the CPU keeps the typed
# copies and zero fills it has always used.
ONE_LAUNCH_STATE_COPIES = True


def _one_launch(device: torch.device) -> bool:
    return ONE_LAUNCH_STATE_COPIES and device.type == "cuda"


def _bytes_of(t: Tensor) -> Tensor:
    """A contiguous tensor's elements as a flat ``uint8`` view: the same memory, whatever the dtype."""
    return t.reshape(-1).view(torch.uint8)


def _as_bytes_ok(*tensors: Tensor) -> bool:
    """Whether the tensors can be copied or zeroed as byte views: contiguous, and no gradient to keep."""
    return all(t.is_contiguous() for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    )


def copy_tensors(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for every i, in as few launches as torch's multi-tensor copy allows.

    Given tensors of several dtypes at once torch copies them one by one (a state's 450 tensors of four dtypes: 451
    copies, 2.3 ms a call on an H100, benchmarks/results/speed.md), so pairs of one dtype and shape, both contiguous,
    go as one list per dtype, or on CUDA with ``ONE_LAUNCH_STATE_COPIES`` as byte views in a single list (one kernel
    for a state's tensors of every dtype: the captured prefill's state in and out, a decoder's state kept and given
    back); the rest one by one."""
    groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    for target, source in zip(targets, sources, strict=True):
        same = target.dtype == source.dtype and target.shape == source.shape and target.device == source.device
        if same and _as_bytes_ok(target, source):
            if _one_launch(target.device):
                target, source = _bytes_of(target), _bytes_of(source)
            into, out_of = groups.setdefault(target.dtype, ([], []))
            into.append(target)
            out_of.append(source)
        else:
            target.copy_(source)
    for into, out_of in groups.values():
        torch._foreach_copy_(into, out_of)


def byte_views(tensors: list[Tensor]) -> list[Tensor] | None:
    """The tensors as flat ``uint8`` views (``torch._foreach_zero_`` of them zeroes every one in one launch), or None
    where one cannot be viewed so (not contiguous, or a gradient to keep). Views of tensors that stay where they are
    (a graph's buffers) can be kept and reused: making them costs the host more than the launch."""
    if not all(_as_bytes_ok(t) for t in tensors):
        return None
    return [_bytes_of(t) for t in tensors]


def zero_tensors(tensors: list[Tensor]) -> None:
    """Every tensor set to zero (0, 0.0, False: all bits clear): contiguous ones as byte views in one multi-tensor
    launch, the rest one by one."""
    flat = [_bytes_of(t) for t in tensors if _as_bytes_ok(t)]
    for t in tensors:
        if not _as_bytes_ok(t):
            t.zero_()
    if flat:
        torch._foreach_zero_(flat)
