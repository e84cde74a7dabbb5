"""The decode section of the suite: tokens/s of one-token steps after a context of C tokens.

Methods:
- ``gqa-static-graph``: ``BaselineGQA.step_static`` over a preallocated cache of ``C`` plus the
  steps timed, captured in a CUDA graph and replayed (eager on the CPU); the decode baseline. On the
  GPU its attention is the split decode kernel over the slots written so far (found from the
  position on the device), not SDPA over every slot with a mask (``dispatch.static_cache_kernel``);
- ``gqa-flash-fixed``: ``BareGQA.decode_fixed``, flash SDPA over exactly ``C`` keys with no mask,
  graph-captured; a reference for how fast static-cache GQA decode could be, not a decoder.
- ``gqa-flash-fused``: the same with the query, key and value projections as one product
  (``BareGQA.fuse_qkv``): the baseline for the bounded layer, whose input projections are fused too.
- ``gqa-growing``: ``BaselineGQA`` with its growing ``KVCache`` (``torch.cat`` each step), eager.
- ``bounded-<config>``: the bounded layer after ``prefill_chunked(..., return_outputs=False)`` of
  the context, stepped through ``coda_gqa_l.decode.CapturedDecoder`` where that exists, else
  eagerly through ``layer.step``. One state is prefilled up to each context in turn. Its query, key, value,
  lambda and write-gate projections are one product (``fuse_input_projections``, as the neural database's
  folded model has them), so its step reads the same weights as ``gqa-flash-fused``'s in as many products.

Steps are timed in samples of ``decode_steps`` (a multiple of every segment length, so each
sample holds the same share of routing steps); tokens/s is 1000 over the median ms per step.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_common import (
    Deadline,
    Settings,
    Shape,
    describe,
    error_fields,
    measure,
    peak_memory,
    release_memory,
    skipped,
    synchronize,
)
from suite_layers import (
    DEADLINE_REASON,
    bare_gqa,
    baseline_gqa,
    bounded_layer,
    build,
    random_tokens,
    weight_bytes,
)

from coda_gqa_l import BoundedCoDAAttention

log = logging.getLogger("suite")

GRAPH_WARMUP_STEPS = 3
SPARE_STEPS = 8  # slots past the timed steps: the profiled step and a margin


def optional_attr(module: str, name: str) -> tuple[Any, str | None]:
    """``module.name`` if it imports, else None and why (the fast paths land separately)."""
    try:
        return getattr(importlib.import_module(module), name), None
    except (ImportError, AttributeError) as exc:
        return None, f"not available: {type(exc).__name__}: {exc}"


def capture_graph(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Capture one call of ``step`` after warming it up on a side stream (its replays run it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def steps_timed(settings: Settings) -> int:
    """Most steps one measurement can take: warm-up call, graph warm-up, all samples, spares."""
    return 1 + GRAPH_WARMUP_STEPS + settings.max_repeats * settings.decode_steps + SPARE_STEPS


def kv_bytes(shape: Shape, tokens: int, settings: Settings) -> int:
    """Bytes of a full KV cache of ``tokens`` tokens: keys plus values."""
    itemsize = torch.empty((), dtype=settings.torch_dtype).element_size()
    return 2 * tokens * shape.num_kv_heads * shape.head_dim * itemsize


def _time_steps(step: Callable[[], object], settings: Settings) -> dict[str, Any]:
    """Capture ``step`` on CUDA (eager on the CPU) and time samples of ``decode_steps`` calls."""
    run: Callable[[], object] = step
    how = "eager (CUDA graphs need a GPU)"
    if settings.cuda:
        how, run = "cuda-graph", capture_graph(step).replay
    with peak_memory(settings.device) as memory:
        timing = measure(run, settings, iters=settings.decode_steps)
    return {"how": how, **timing, "tokens_per_s": 1e3 / timing["median_ms"], **memory.fields()}


def _row(shape: Shape, method: str, context: int) -> dict[str, Any]:
    return {"section": "decode", "shape": shape.name, "method": method, "context": context}


def _gqa_static(shape: Shape, context: int, settings: Settings) -> dict[str, Any]:
    layer = build(lambda: baseline_gqa(shape), settings)
    cache = layer.init_static_cache(1, context + steps_timed(settings))
    with peak_memory(settings.device) as prefill_memory:
        layer(random_tokens(shape, context, settings), cache)
    x_t = random_tokens(shape, 1, settings)
    result = _time_steps(lambda: layer.step_static(x_t, cache), settings)
    result |= {"state_bytes": cache.nbytes(), "weight_bytes": weight_bytes(layer)}
    result["prefill_peak_bytes"] = prefill_memory.peak_bytes
    result["attention_kernels"] = _attention_kernels(lambda: layer.step_static(x_t, cache), settings)
    return result


def _gqa_flash_fixed(shape: Shape, context: int, settings: Settings, fused: bool = False) -> dict[str, Any]:
    layer = build(lambda: bare_gqa(shape), settings)
    if fused:
        layer.fuse_qkv()
    cache_shape = (1, shape.num_kv_heads, context, shape.head_dim)
    k_cache = torch.randn(cache_shape, device=settings.device, dtype=settings.torch_dtype)
    v_cache = torch.randn_like(k_cache)
    slot = torch.full((1,), context - 1, device=settings.device, dtype=torch.int64)
    x_t = random_tokens(shape, 1, settings)
    step = lambda: layer.decode_fixed(x_t, k_cache, v_cache, slot)  # noqa: E731
    result = _time_steps(step, settings)
    result |= {"state_bytes": k_cache.nbytes + v_cache.nbytes, "weight_bytes": weight_bytes(layer)}
    result["attention_kernels"] = _attention_kernels(step, settings)
    return result


def _gqa_growing(shape: Shape, context: int, settings: Settings) -> dict[str, Any]:
    layer = build(lambda: baseline_gqa(shape), settings)
    cache = layer.init_cache(1)
    layer(random_tokens(shape, context, settings), cache)
    x_t = random_tokens(shape, 1, settings)
    with peak_memory(settings.device) as memory:
        timing = measure(lambda: layer(x_t, cache), settings, iters=settings.decode_steps)
    return {
        "how": "eager, torch.cat per step",
        **timing,
        "tokens_per_s": 1e3 / timing["median_ms"],
        **memory.fields(),
        "state_bytes": cache.nbytes(),
        "weight_bytes": weight_bytes(layer),
    }


def _attention_kernels(step: Callable[[], object], settings: Settings) -> list[str] | None:
    """Names of the device kernels one step launches: shows which SDPA backend a mask allowed."""
    if not settings.cuda:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = {event.key for event in prof.key_averages()}
    wanted = ("fmha", "flash", "attention", "attn", "cudnn", "softmax", "gemv")
    return sorted(name[:120] for name in names if any(word in name.lower() for word in wanted))


def _run_gqa(
    shape: Shape, contexts: list[int], settings: Settings, deadline: Deadline, rows: list[dict[str, Any]]
) -> None:
    methods = {
        "gqa-static-graph": _gqa_static,
        "gqa-flash-fixed": _gqa_flash_fixed,
        "gqa-flash-fused": lambda shape, context, settings: _gqa_flash_fixed(shape, context, settings, fused=True),
        "gqa-growing": _gqa_growing,
    }
    for method, run in methods.items():
        for context in contexts:
            row = _row(shape, method, context) | {"full_cache_bytes": kv_bytes(shape, context, settings)}
            if deadline.section_expired():
                row |= skipped(DEADLINE_REASON)
            else:
                try:
                    with torch.inference_mode():
                        row |= {"status": "ok", **run(shape, context, settings)}
                except Exception as exc:
                    row |= error_fields(exc)
                release_memory(settings.device)
            rows.append(row)
            log.info(describe(row))


def _bounded_stepper(layer: BoundedCoDAAttention, state: Any, x_t: torch.Tensor) -> tuple[Callable[[], object], str]:
    decoder_class, why_not = optional_attr("coda_gqa_l.decode", "CapturedDecoder")
    if decoder_class is not None and x_t.device.type != "cuda":
        decoder_class, why_not = None, "needs CUDA"
    if decoder_class is not None:
        decoder = decoder_class(layer, state)
        return (lambda: decoder(x_t)), "CapturedDecoder"
    return (lambda: layer.step(x_t, state)), f"eager layer.step (CapturedDecoder {why_not})"


def _run_bounded(
    shape: Shape,
    config: str,
    contexts: list[int],
    settings: Settings,
    deadline: Deadline,
    rows: list[dict[str, Any]],
) -> None:
    layer = build(lambda: bounded_layer(shape, config), settings)
    assert isinstance(layer, BoundedCoDAAttention)
    layer.fuse_input_projections()  # inference only, as the folded model of the neural database
    state = layer.init_state(1)
    prefill_rate: float | None = None  # tokens/s of the context prefills so far, to plan ahead
    for context in sorted(contexts):
        row = _row(shape, f"bounded-{config}", context) | {
            "full_cache_bytes": layer.full_cache_bytes(context, 1, settings.torch_dtype),
            "state_bytes": layer.cache_bytes(1, settings.torch_dtype),
            "weight_bytes": weight_bytes(layer),
        }
        missing = max(0, context - state.pos)
        if deadline.section_expired():
            rows.append(row | skipped(DEADLINE_REASON))
            continue
        if prefill_rate and missing / prefill_rate > deadline.section_left_s():
            rows.append(row | skipped(f"prefilling {missing} tokens would take ~{missing / prefill_rate:.0f} s"))
            continue
        try:
            with torch.inference_mode():
                with peak_memory(settings.device) as prefill_memory:
                    began = time.perf_counter()
                    if missing:
                        layer.prefill_chunked(
                            random_tokens(shape, missing, settings), state, settings.block_size, return_outputs=False
                        )
                    synchronize(settings.device)
                if missing:
                    prefill_rate = missing / (time.perf_counter() - began)
                row |= {"start_position": state.pos, "prefill_peak_bytes": prefill_memory.peak_bytes}
                step, how = _bounded_stepper(layer, state, random_tokens(shape, 1, settings))
                with peak_memory(settings.device) as memory:
                    timing = measure(step, settings, iters=settings.decode_steps)
            row |= {"status": "ok", "how": how, **timing, "tokens_per_s": 1e3 / timing["median_ms"], **memory.fields()}
        except Exception as exc:
            row |= error_fields(exc)
        rows.append(row)
        log.info(describe(row))
    del layer, state
    release_memory(settings.device)


def decode_section(
    shapes: list[Shape], configs: list[str], contexts: list[int], settings: Settings, deadline: Deadline
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        _run_gqa(shape, contexts, settings, deadline, rows)
        for config in configs:
            _run_bounded(shape, config, contexts, settings, deadline, rows)
    return rows
