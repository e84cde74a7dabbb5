"""Timing, memory and bookkeeping helpers shared by ``run_suite.py`` and ``public_child.py``.

This module must not import ``coda_gqa_l``: the public-package child imports it next to the
public wheel, whose import name is also ``coda_gqa_l``.

Timing follows the device method (``/work/.library/device/METHOD.md``): device events around
the region on CUDA (a host clock after a synchronisation on the CPU), warm-up first, several
repeats and their median; a short call is repeated inside one timed sample so that launch and
event overheads stay small against it.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """One attention layer's shape: width ``D``, query heads ``H``, KV heads, head size."""

    name: str
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


SHAPES = {
    "7B": Shape("7B", 4096, 32, 8, 128),
    "70B": Shape("70B", 8192, 64, 8, 128),
    "quick": Shape("quick", 64, 4, 2, 16),
}

# (window, exact, summary) slots; "window" is window-only with the storage of "medium" (384).
CONFIG_SLOTS = {
    "tiny": (128, 32, 32),
    "medium": (256, 64, 64),
    "large": (512, 128, 128),
    "window": (384, 0, 0),
}


@dataclass
class Settings:
    """How hard to measure; shared by every section (and sent to the public child as JSON)."""

    device: str
    dtype: str
    max_repeats: int = 10
    min_repeats: int = 3
    measure_budget_s: float = 2.0
    target_sample_ms: float = 10.0
    decode_steps: int = 64
    block_size: int = 4096
    threads: int | None = None  # CPU threads; None keeps torch's default

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def routing_left_out() -> Iterator[None]:
    """Inside, bounded layers' graph steps launch no routing kernel (``decode.route_chunk_triton`` a no-op; read when a
    graph is captured, not when it is replayed): for timing what routing costs a captured prefill, whose outputs are
    then wrong. On the caller's stream (one piece) its result is unpacked: the banks as they were and snapshots left
    unwritten."""
    import coda_gqa_l.decode as decode_module
    from coda_gqa_l.kernels.routing import routing_snapshots

    def no_routing(banks: Any, *args: Any, n: int, config: Any, snapshots: Any = None, **kwargs: Any) -> Any:
        if snapshots is None:
            snapshots = routing_snapshots(banks, n // config.segment)
        return (banks, *snapshots)

    routing = decode_module.route_chunk_triton
    decode_module.route_chunk_triton = no_routing
    try:
        yield
    finally:
        decode_module.route_chunk_triton = routing


def time_once_ms(fn: Callable[[], object], device: str, iters: int = 1) -> float:
    """Milliseconds per call of ``fn``, called ``iters`` times inside one timed sample."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - began) * 1e3 / iters


def measure(
    fn: Callable[[], object],
    settings: Settings,
    *,
    setup: Callable[[], object] | None = None,
    iters: int | None = None,
) -> dict[str, Any]:
    """Median milliseconds per call of ``fn`` over several repeats.

    ``setup`` runs untimed before every sample (e.g. a fresh state). ``iters`` calls per sample;
    ``None`` picks enough for a sample of about ``target_sample_ms`` (one call when ``setup``
    is given, since a setup must precede each call). Stops after ``max_repeats`` samples, or
    earlier once ``min_repeats`` are in and ``measure_budget_s`` is spent.
    """
    device = settings.device
    if setup is not None:
        setup()
    warm_up_ms = time_once_ms(fn, device)  # compilation, autotuning, allocator growth
    if iters is None:
        if setup is not None or warm_up_ms > settings.target_sample_ms:
            iters = 1  # a long call is its own sample; no second call to size it
        else:  # a second, warm call sizes the samples
            iters = max(1, min(200, math.ceil(settings.target_sample_ms / max(time_once_ms(fn, device), 1e-3))))
    samples: list[float] = []
    began = time.perf_counter()
    while len(samples) < settings.max_repeats:
        if len(samples) >= settings.min_repeats and time.perf_counter() - began > settings.measure_budget_s:
            break
        if setup is not None:
            setup()
        samples.append(time_once_ms(fn, device, iters))
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "repeats": len(samples),
        "iters_per_sample": iters,
    }


@dataclass
class PeakMemory:
    """Peak device memory while the ``with`` block ran (CUDA only; None on the CPU)."""

    device: str
    start_bytes: int | None = None
    peak_bytes: int | None = None

    @property
    def over_start_bytes(self) -> int | None:
        if self.peak_bytes is None or self.start_bytes is None:
            return None
        return self.peak_bytes - self.start_bytes

    def fields(self) -> dict[str, int | None]:
        return {"peak_bytes": self.peak_bytes, "peak_over_start_bytes": self.over_start_bytes}


@contextmanager
def peak_memory(device: str) -> Iterator[PeakMemory]:
    record = PeakMemory(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        record.start_bytes = torch.cuda.memory_allocated()
    yield record
    if cuda:
        torch.cuda.synchronize()
        record.peak_bytes = torch.cuda.max_memory_allocated()


def error_fields(exc: BaseException) -> dict[str, Any]:
    """How a failed measurement is recorded: the error and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:600], "raised_at": where}


def cuda_context_usable(device: str) -> bool:
    """False once an asynchronous CUDA error has poisoned the context (every later call fails)."""
    if torch.device(device).type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False


def release_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@dataclass
class Deadline:
    """Wall-clock budget of the whole suite, shared out among sections as they start.

    A section gets the remaining time times its weight over the weights of the sections not
    yet run, so time a fast section leaves over rolls on to the next ones.
    """

    total_s: float
    weights: dict[str, float]
    began: float = field(default_factory=time.perf_counter)
    section_end: float = math.inf
    done: set[str] = field(default_factory=set)

    def remaining_s(self) -> float:
        return self.total_s - (time.perf_counter() - self.began)

    def start_section(self, name: str) -> float:
        pending = sum(w for key, w in self.weights.items() if key not in self.done)
        share = self.weights.get(name, 1.0) / pending if pending > 0 else 1.0
        budget = max(0.0, self.remaining_s()) * share
        self.section_end = time.perf_counter() + budget
        self.done.add(name)
        return budget

    def section_expired(self) -> bool:
        return time.perf_counter() > self.section_end or self.remaining_s() <= 0

    def section_left_s(self) -> float:
        return max(0.0, min(self.section_end - time.perf_counter(), self.remaining_s()))


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def tokens_per_s(tokens: int, median_ms: float) -> float:
    return tokens * 1e3 / median_ms


def describe(row: dict[str, Any]) -> str:
    """One progress line for a result row."""
    where = " ".join(str(row[k]) for k in ("section", "shape", "method", "impl", "direction") if k in row)
    size = next((f"{k}={row[k]}" for k in ("length", "context") if k in row), "")
    if row.get("status") == "ok":
        value = next((f"{k}={row[k]:.4g}" for k in ("tokens_per_s", "tflops", "median_ms") if row.get(k)), "")
        return f"{where} {size} ok {value}"
    return f"{where} {size} {row.get('status')}: {row.get('error') or row.get('reason')}"


def run_header(script: str, argv: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What every result file starts with: the command, the time, the device (with the GPU's name), the dtype, torch's
    version and the machine."""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return {
        "command": f"python benchmarks/{script} " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": str(device) + gpu,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def write_result(result: dict[str, Any], path: Path, table: list[str]) -> None:
    """Write ``result`` as JSON to ``path`` (making its folder), then print ``table`` and where the JSON went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(table))
    print(f"wrote {path}")


def graphed_call_seconds(call: Callable[[], object], calls: int, repeats: int, device: torch.device) -> float:
    """Median seconds per ``call()``: on CUDA, ``calls`` calls captured in one CUDA graph (after two warm-up calls on
    a side stream, as capture wants) and the graph replayed ``repeats`` times, so launch overhead is a graph's, as in
    a model's captured step; elsewhere ``repeats`` plain loops of ``calls`` calls."""
    times = []
    if device.type != "cuda":
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(calls):
                call()
            times.append((time.perf_counter() - began) / calls)
        return statistics.median(times)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    torch.cuda.synchronize(device)
    for _ in range(repeats):
        began = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - began) / calls)
    return statistics.median(times)


def quick_or_cuda(quick: bool, why: str) -> tuple[torch.device, torch.dtype] | None:
    """Where a kernel benchmark runs: with ``--quick`` the CPU in float32 (Triton's interpreter, which must be on),
    else CUDA in bfloat16; ``None``, after saying why, where neither can run (``why``: what the script needs a GPU
    for)."""
    from coda_gqa_l.kernels import dispatch

    if quick:
        if dispatch.interpreting():
            return torch.device("cpu"), torch.float32
        print("--quick runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1 CODA_GQA_L_KERNELS=triton")
        return None
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    print(f"{why}: no GPU here (--quick runs tiny shapes in the interpreter)")
    return None
