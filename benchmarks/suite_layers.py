"""Layer builders and the prefill, training-step and device-ceiling sections of the suite.

Every section returns a list of rows (dicts) that ``run_suite.py`` writes to JSON; a row has a
``status`` of ``ok``, ``error`` (with the error) or ``skipped`` (with the reason).

Methods measured here:
- ``gqa-bare``: ``bare_gqa.BareGQA``, the fairness reference;
- ``gqa-baseline``: ``coda_gqa_l.BaselineGQA`` (must be within 10% of the bare layer);
- ``bounded-<config>``: ``coda_gqa_l.captured_prefill.CapturedPrefill`` from a fresh state on CUDA (``state=None``:
  made inside; one graph replay a chunk of its default length, as decode steps through ``CapturedDecoder``), else
  ``prefill_chunked`` in blocks of the suite's block size;
- ``bounded-<config>-eager``: ``BoundedCoDAAttention.prefill_chunked`` from a fresh state in blocks of the suite's
  block size (CUDA only: elsewhere
  ``bounded-<config>`` is this);
- ``coda-unbounded``: ``CoDAGQA`` (training step only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from bare_gqa import BareGQA
from bench_common import (
    CONFIG_SLOTS,
    Deadline,
    Settings,
    Shape,
    describe,
    error_fields,
    measure,
    peak_memory,
    release_memory,
    skipped,
    tokens_per_s,
)
from torch import nn

from coda_gqa_l import BaselineGQA, BoundedCoDAAttention, BoundedConfig, CoDAGQA
from coda_gqa_l.differential import finite_checked_upstream

log = logging.getLogger("suite")

DEADLINE_REASON = "the suite's time budget for this section ran out (raise --deadline-s)"


def bounded_config(name: str) -> BoundedConfig:
    """The named preset, or window-only: 384 window slots and no banks (medium's storage)."""
    if name == "window":
        window, exact, summary = CONFIG_SLOTS["window"]
        return BoundedConfig(window=window, num_landmarks_exact=exact, num_landmarks_summary=summary)
    return BoundedConfig.preset(name)


Module = TypeVar("Module", bound=nn.Module)


def build(factory: Callable[[], Module], settings: Settings) -> Module:
    """Build a module directly on the device in the benchmark dtype.

    Building under a default dtype (rather than ``.to(dtype)`` afterwards) keeps buffers that
    are created in float64 on purpose (RoPE frequencies) in float64.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(settings.torch_dtype)
    try:
        with torch.device(settings.device):
            return factory().eval()
    finally:
        torch.set_default_dtype(previous)


def bare_gqa(shape: Shape) -> BareGQA:
    return BareGQA(shape.embed_dim, shape.num_heads, shape.num_kv_heads, shape.head_dim)


def baseline_gqa(shape: Shape) -> BaselineGQA:
    return BaselineGQA(shape.embed_dim, shape.num_heads, shape.num_kv_heads, head_dim=shape.head_dim)


def bounded_layer(shape: Shape, config: str) -> BoundedCoDAAttention:
    return BoundedCoDAAttention(
        shape.embed_dim, shape.num_heads, shape.num_kv_heads, head_dim=shape.head_dim, config=bounded_config(config)
    )


def random_tokens(shape: Shape, length: int, settings: Settings) -> torch.Tensor:
    """Random hidden states ``(1, length, D)``: never zeros, which can run faster than data."""
    return torch.randn(1, length, shape.embed_dim, device=settings.device, dtype=settings.torch_dtype)


def weight_bytes(layer: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


# ---------------------------------------------------------------------------------------- prefill
PrefillRun = tuple[str, Callable[[], nn.Module], Callable[[nn.Module, torch.Tensor], Callable[[], object]]]


def _whole_sequence(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: layer(x)


def _chunked_prefill(block_size: int) -> Callable[[nn.Module, torch.Tensor], Callable[[], object]]:
    def make(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        assert isinstance(layer, BoundedCoDAAttention)
        # a fresh state per call: init_state is a handful of small allocations, counted in
        return lambda: layer.prefill_chunked(x, layer.init_state(1), block_size)

    return make


def _captured_prefill() -> Callable[[nn.Module, torch.Tensor], Callable[[], object]]:
    def make(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        from coda_gqa_l.captured_prefill import CapturedPrefill

        assert isinstance(layer, BoundedCoDAAttention)
        # its own default chunk, not the suite's block size (which the eager rows take): the chunk is part of how
        # the captured prefill is built to run; graphs captured by the first (untimed) call
        prefill = CapturedPrefill(layer)
        return lambda: prefill(x)  # a fresh state made inside (state=None), as a document's ingest starts

    return make


def prefill_methods(shape: Shape, configs: list[str], settings: Settings) -> list[PrefillRun]:
    runs: list[PrefillRun] = [
        ("gqa-bare", lambda: bare_gqa(shape), _whole_sequence),
        ("gqa-baseline", lambda: baseline_gqa(shape), _whole_sequence),
    ]
    for config in configs:
        factory = lambda c=config: bounded_layer(shape, c)  # noqa: E731
        if settings.cuda:
            runs.append((f"bounded-{config}", factory, _captured_prefill()))
            runs.append((f"bounded-{config}-eager", factory, _chunked_prefill(settings.block_size)))
        else:
            runs.append((f"bounded-{config}", factory, _chunked_prefill(settings.block_size)))
    return runs


def gqa_prefill_flops(shape: Shape, length: int) -> float:
    """Matrix FLOPs of one causal GQA layer over ``length`` tokens: projections plus attention
    (QK^T and PV, 2 * 2 * L^2 * H * Dh, halved by the causal mask)."""
    d, h, hkv, dh = shape.embed_dim, shape.num_heads, shape.num_kv_heads, shape.head_dim
    projections = 2 * length * d * (2 * h * dh + 2 * hkv * dh)
    return projections + 2 * length * length * h * dh


def prefill_section(
    shapes: list[Shape], configs: list[str], lengths: list[int], settings: Settings, deadline: Deadline
) -> list[dict[str, Any]]:
    rows = []
    for shape in shapes:
        inputs = {length: random_tokens(shape, length, settings) for length in lengths}
        for method, factory, make_run in prefill_methods(shape, configs, settings):
            layer = build(factory, settings)
            for length in lengths:
                row: dict[str, Any] = {"section": "prefill", "shape": shape.name, "method": method, "length": length}
                if deadline.section_expired():
                    row |= skipped(DEADLINE_REASON)
                else:
                    row |= measure_prefill(make_run(layer, inputs[length]), length, settings)
                if method.startswith("gqa-"):
                    row["floor_flops"] = gqa_prefill_flops(shape, length)
                rows.append(row)
                log.info(describe(row))
            del layer
            release_memory(settings.device)
        del inputs
        release_memory(settings.device)
    return rows


def measure_prefill(run: Callable[[], object], length: int, settings: Settings) -> dict[str, Any]:
    """Every layer timed as it runs inside a model, whose adapter tests a forward's input for NaN and Inf once
    (``finite_checked_upstream``): a layer called on its own reads its input back to test it, a host
    synchronisation per call that the bare layer does not make (``BaselineGQA`` measured 0.853 of the bare layer at
    2K with it, on an H100 on 2026-12-06)."""
    try:
        with torch.inference_mode(), finite_checked_upstream(), peak_memory(settings.device) as memory:
            timing = measure(run, settings)
    except Exception as exc:  # recorded, not hidden: the row says what failed
        return error_fields(exc)
    return {"status": "ok", **timing, "tokens_per_s": tokens_per_s(length, timing["median_ms"]), **memory.fields()}


# ---------------------------------------------------------------------------------------- training
def train_section(shapes: list[Shape], length: int, settings: Settings, deadline: Deadline) -> list[dict[str, Any]]:
    """Forward + backward of one layer on ``(1, length, D)`` (input gradient included)."""
    factories: list[tuple[str, Callable[[Shape], nn.Module]]] = [
        ("gqa-bare", bare_gqa),
        ("gqa-baseline", baseline_gqa),
        (
            "coda-unbounded",
            lambda s: CoDAGQA(s.embed_dim, s.num_heads, s.num_kv_heads, head_dim=s.head_dim),
        ),
    ]
    rows = []
    for shape in shapes:
        x = random_tokens(shape, length, settings).requires_grad_(True)
        grad = random_tokens(shape, length, settings)
        for method, factory in factories:
            row: dict[str, Any] = {"section": "train", "shape": shape.name, "method": method, "length": length}
            if deadline.section_expired():
                rows.append(row | skipped(DEADLINE_REASON))
                continue
            layer = build(lambda f=factory, s=shape: f(s), settings).train()
            row |= _measure_train_step(layer, x, grad, length, settings)
            rows.append(row)
            log.info(describe(row))
            del layer
            release_memory(settings.device)
    return rows


def _measure_train_step(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, length: int, settings: Settings
) -> dict[str, Any]:
    def clear_grads() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def step() -> None:
        layer(x).backward(grad)

    try:
        with peak_memory(settings.device) as memory:
            timing = measure(step, settings, setup=clear_grads)
    except Exception as exc:
        return error_fields(exc)
    return {"status": "ok", **timing, "tokens_per_s": tokens_per_s(length, timing["median_ms"]), **memory.fields()}


# ---------------------------------------------------------------------------------------- ceilings
def device_ceilings(settings: Settings) -> dict[str, Any]:
    """The two rates of the roofline, measured here: device-to-device copy bandwidth (bytes read
    plus written) and a large bf16 matrix product's rate, both on random data."""
    if not settings.cuda:
        return skipped("ceilings are measured on CUDA only")
    try:
        copy_rate, matmul_rate = _copy_bytes_per_s(settings), _matmul_flops_per_s(settings)
    except Exception as exc:
        return error_fields(exc)
    finally:
        release_memory(settings.device)
    return {"status": "ok", "copy_bytes_per_s": copy_rate, "bf16_matmul_flops_per_s": matmul_rate}


def _copy_bytes_per_s(settings: Settings) -> float:
    source = torch.randn(2**28, device=settings.device, dtype=torch.bfloat16)  # 512 MiB
    target = torch.empty_like(source)
    timing = measure(lambda: target.copy_(source), settings)
    return 2 * source.nbytes / (timing["median_ms"] * 1e-3)


def _matmul_flops_per_s(settings: Settings, n: int = 8192) -> float:
    a = torch.randn(n, n, device=settings.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=settings.device, dtype=torch.bfloat16)
    timing = measure(lambda: a @ b, settings)
    return 2 * n**3 / (timing["median_ms"] * 1e-3)
