"""Which implementation runs: the Triton kernels or the PyTorch references. Every such choice is
made here, from nine environment variables read nowhere else: ``CODA_GQA_L_KERNELS`` (the backend;
tests set it to compare paths on the same inputs), ``CODA_GQA_L_UNBOUNDED_ATTENTION`` (how unbounded
differential attention runs on Triton), ``CODA_GQA_L_AUTOTUNE`` (whether kernels autotune),
``CODA_GQA_L_FP32_DOTS`` (how the attention kernels multiply float32 tiles on a GPU),
``CODA_GQA_L_READ_PIECES`` (how many chunks a graph-captured prefill pipelines),
``CODA_GQA_L_STEPPED_READ_TOKENS`` (how short a prefill's piece is read by graph steps),
``CODA_GQA_L_KEY_FOLLOWERS`` (whether the routing kernel writes key rows in programs of their own),
``CODA_GQA_L_ROUTING_AHEAD`` (whether a GPU prefill routes a chunk on a side stream beside the attention of the one
before) and ``CODA_GQA_L_PRODUCT_CARVEOUT`` (whether a captured prefill's products leave the routing's
multiprocessors free). The layers ask for a decision by name (``fused_bounded_chunk``, ``unbounded_attention``,
``fused_combine``, ``inference_routing``, ``inference_attention``); the kernel modules ask ``use_triton``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import importlib.util
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

BACKEND_ENV = "CODA_GQA_L_KERNELS"
Backend = Literal["triton", "torch"]
UNBOUNDED_ENV = "CODA_GQA_L_UNBOUNDED_ATTENTION"
UnboundedPath = Literal["fused", "sdpa"]
AUTOTUNE_ENV = "CODA_GQA_L_AUTOTUNE"
FP32_DOTS_ENV = "CODA_GQA_L_FP32_DOTS"
READ_PIECES_ENV = "CODA_GQA_L_READ_PIECES"
DEFAULT_READ_PIECES = 2  # measured on an H100, 2026-12-06: benchmarks/results/speed.md, "The pipelined read"
STEPPED_READ_ENV = "CODA_GQA_L_STEPPED_READ_TOKENS"
KEY_FOLLOWERS_ENV = "CODA_GQA_L_KEY_FOLLOWERS"
ROUTING_AHEAD_ENV = "CODA_GQA_L_ROUTING_AHEAD"
PRODUCT_CARVEOUT_ENV = "CODA_GQA_L_PRODUCT_CARVEOUT"
# H100, 2026-12-06, SmolLM2 after 8K tokens (benchmarks/question_read.py): steps 6.3x the forward's speed for 1
# token, 1.6x for 32, 0.90x for 64
DEFAULT_STEPPED_READ_TOKENS = 32
Float32Dots = Literal["ieee", "tf32x3", "tf32"]
FLOAT32_DOTS: tuple[Float32Dots, ...] = ("ieee", "tf32x3", "tf32")
# torch.get_float32_matmul_precision() -> ours: "high" allows TF32 in torch's own products; ours take the three-pass
# TF32 split (near float32) there, and one TF32 pass only where torch would drop to bfloat16 ("medium")
_FROM_TORCH_PRECISION: dict[str, Float32Dots] = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
UnboundedAttention = Literal["sdpa", "fused", "reference"]


OLDEST_TRITON = (3, 4)  # the kernels' dependent launches (gdc_wait, launch_pdl) came with Triton 3.4
NO_TRITON = "Triton is not installed"  # the one problem not worth a warning (the CPU's usual case)


def triton_problem() -> str | None:
    """Why the Triton kernels cannot run here (not installed, or older than ``OLDEST_TRITON``: torch's CUDA wheels
    before 2.8 bring 3.3 or older), or None. Read from the installed package's metadata: Triton is not imported.
    Not cached itself: ``triton_available`` keeps the answer (one cache, which torch.compile traces through)."""
    if importlib.util.find_spec("triton") is None:
        return NO_TRITON
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # an unpackaged checkout: trust it
        return None
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < OLDEST_TRITON:
        oldest = ".".join(map(str, OLDEST_TRITON))
        return f"Triton {version} is older than {oldest}, which the kernels need (torch 2.8 or newer brings it)"
    return None


@functools.cache
def triton_available() -> bool:
    """True when Triton can be imported and is new enough (a CUDA build of it, or its CPU interpreter); an older one
    is reported once, and the PyTorch path runs instead."""
    problem = triton_problem()
    if problem not in (None, NO_TRITON):
        warnings.warn(f"{problem}; the PyTorch reference path runs instead", RuntimeWarning, stacklevel=2)
    return problem is None


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend(device: torch.device | str) -> Backend:
    """The backend for tensors on ``device``.

    ``auto`` (the default): Triton on CUDA when it is installed, else PyTorch. ``torch`` always
    picks the reference. ``triton`` insists: it raises when Triton cannot run on ``device``.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be 'auto', 'triton' or 'torch', got {choice!r}")
    device_type = torch.device(device).type
    if choice == "torch":
        return "torch"
    runnable = triton_available() and (device_type == "cuda" or (device_type == "cpu" and interpreting()))
    if choice == "triton":
        if not runnable:
            why = triton_problem() or f"tensors are on {device_type}"
            hint = "" if device_type == "cuda" else " (on a CPU set TRITON_INTERPRET=1 before importing triton)"
            raise RuntimeError(f"{BACKEND_ENV}=triton but the Triton kernels cannot run: {why}{hint}")
        return "triton"
    return "triton" if runnable and device_type == "cuda" else "torch"


_PLAIN_REFERENCE = contextvars.ContextVar("coda_gqa_l_plain_reference", default=False)


@contextlib.contextmanager
def _chosen(flag: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    """``flag`` set to ``value`` inside the block (this context only), as it was after."""
    token = flag.set(value)
    try:
        yield
    finally:
        flag.reset(token)


def plain_reference() -> contextlib.AbstractContextManager[None]:
    """Inside this block the PyTorch reference runs without its shortcuts (the decode step's
    per-segment view, decode_view.py; the CPU inference routing, routing_cpu.py): what the
    tests compare the shortcuts against."""
    return _chosen(_PLAIN_REFERENCE, True)


def decode_view_allowed() -> bool:
    """Whether a one-token step on the reference path may use the segment's cached key block."""
    return not _PLAIN_REFERENCE.get()


def inference_routing(device: torch.device | str) -> bool:
    """Whether bank routing that needs no gradients or metrics may run the CPU inference path
    (``routing_cpu.py``: the reference's results in fewer operations) instead of the plain reference."""
    return torch.device(device).type == "cpu" and not _PLAIN_REFERENCE.get()


def inference_attention(device: torch.device | str) -> bool:
    """Whether the bounded layer's attention over a chunk that needs no gradients may run the banded
    inference path (``banded_attention.py``: window keys rotated once per chunk, read in place) instead of
    the plain reference's per-segment key blocks."""
    return torch.device(device).type == "cpu" and not _PLAIN_REFERENCE.get()


def unbounded_path() -> UnboundedPath:
    """How unbounded differential self-attention runs on the Triton backend (``CODA_GQA_L_UNBOUNDED_ATTENTION``).

    ``sdpa`` (the default): where there is no cached prefix (training, a first prefill chunk),
    the fused RoPE and noise rotation (``rope.rotate_and_stack``), PyTorch's SDPA (cuDNN / flash)
    over the stacked queries and the fused combine (``combine.differential_combine``); with a
    prefix, the fused kernel. ``fused``: always the one Triton kernel for both streams, the
    combine and the head norm. On an H100 the sdpa path trains a small model at 1.04x GQA's step
    time against the fused kernel's 1.54x, and one 7B-shaped layer's forward + backward in half
    the fused kernel's time (benchmarks/results/from_scratch.md, "CoDA's step time with SDPA").
    """
    choice = os.environ.get(UNBOUNDED_ENV, "sdpa").strip().lower() or "sdpa"
    if choice not in ("fused", "sdpa"):
        raise ValueError(f"{UNBOUNDED_ENV} must be 'fused' or 'sdpa', got {choice!r}")
    return choice  # type: ignore[return-value]


_COMPILING_AHEAD = contextvars.ContextVar("coda_gqa_l_compiling_ahead", default=False)


def launch(
    kernel: Any, grid: tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]], *args: Any, **meta: Any
) -> None:
    """Every Triton kernel of the package starts here: it runs, or, inside ``compile_ahead``, only has its binary
    for these arguments compiled (on the thread pool), writing nothing."""
    if _COMPILING_AHEAD.get():
        kernel.warmup(*args, grid=grid, **meta)
    else:
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def compile_ahead(workers: int | None = None) -> Iterator[bool]:
    """Inside, kernel launches compile their kernels on ``workers`` threads instead of running (Triton's
    ``AsyncCompileMode``), each thread loading what it compiled (``_loading_too``); leaving waits for every
    compile. Yields whether it is active: not in the interpreter (nothing to compile) nor with a Triton without the
    mode, where launches run as usual.

    For a warm-up whose outputs are thrown away (a graph decoder's, on scratch states): a first request in a fresh
    process otherwise compiles its kernels one after another (about a minute for SmolLM2's ingest and answers on an
    H100). The outputs the skipped kernels would have written stay uninitialised; torch's own operations still run
    on them, so nothing in such a warm-up may index with a kernel's output."""
    import triton

    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None or interpreting() or _COMPILING_AHEAD.get():
        yield False
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool, _loading_too(mode)(pool):
        token = _COMPILING_AHEAD.set(True)
        try:
            yield True
        finally:
            _COMPILING_AHEAD.reset(token)


def _loading_too(mode: type) -> type:
    """Triton's ``AsyncCompileMode`` whose worker threads also load each compiled kernel (``_init_handles``: the
    module load and, in Triton releases before the shared launcher, a C launcher built with the system compiler for
    each signature). Otherwise those run one after another in the thread of each binary's first launch: for the
    database's first request (17 binaries, benchmarks/kernel_compiles.py) the compiles would overlap on the threads
    but the launcher builds would not. The device is the one current where the launch asked for the compile."""

    class CompileAndLoad(mode):  # type: ignore[misc,valid-type]
        def submit(self, key: Any, compile_fn: Callable[[], Any], *callbacks: Any) -> Any:
            index = torch.cuda.current_device() if torch.cuda.is_available() else None
            on_device = (lambda: torch.cuda.device(index)) if index is not None else contextlib.nullcontext
            return super().submit(key, compile_then_load(compile_fn, on_device), *callbacks)

    return CompileAndLoad


def compile_then_load(
    compile_fn: Callable[[], Any], on_device: Callable[[], contextlib.AbstractContextManager[Any]]
) -> Callable[[], Any]:
    """``compile_fn`` followed by the compiled kernel's load on the device ``on_device()`` makes current. A failed
    load is left for the kernel's first launch to report (it loads again there)."""

    def run() -> Any:
        kernel = compile_fn()
        load = getattr(kernel, "_init_handles", None)
        if load is not None:
            try:
                with on_device():
                    load()
            except Exception:  # noqa: BLE001 - reported by the first launch, which retries the load
                pass
        return kernel

    return run


_ONE_PROGRAM_DECODE = contextvars.ContextVar("coda_gqa_l_one_program_decode", default=False)


def one_program_decode() -> contextlib.AbstractContextManager[None]:
    """Inside, a one-token attention step runs the forward's one program per head instead of the split forward
    (``diff_attention``): for the benchmark and tests that compare the two on the same inputs."""
    return _chosen(_ONE_PROGRAM_DECODE, True)


def split_decode() -> bool:
    """Whether a one-token attention step splits its keys over programs (the default)."""
    return not _ONE_PROGRAM_DECODE.get()


def read_pieces() -> int:
    """How many chunks a graph-captured prefill reads in one replay, as a pipeline: layer ``l`` of chunk ``c`` beside
    layer ``l - 1`` of chunk ``c + 1``, each chunk's routing on a side stream (``models.graph_decode``). The routing
    kernel runs one program per KV head and bank, so one chunk leaves most of a GPU idle while it routes.
    ``CODA_GQA_L_READ_PIECES`` overrides the default (2; 1 reads one chunk at a time). Two pieces were chosen on an
    H100 (2026-12-06, the greedy tokens of 2 and 4 pieces equal to one piece's at 8K, 32K and 128K): ingest at
    128K 1.4x one piece's with peak memory unchanged (285 MiB); four pieces read 1.8x but peak at 318 MiB, above
    the issue's 312. The first read in a process captures the pipelined graph: 8K tokens in 0.07 s with one piece,
    0.38 s with two, 2.8 s with four."""
    raw = os.environ.get(READ_PIECES_ENV, "").strip()
    if not raw:
        return DEFAULT_READ_PIECES
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{READ_PIECES_ENV} must be a positive whole number, got {raw!r}")
    return int(raw)


def stepped_read_tokens() -> int:
    """The longest piece of a prompt or document that a graph-captured prefill reads one token at a time through the
    decode step's graphs rather than through the model's eager forward: a question after a saved document, the
    token ``generate()`` hands over with a filled cache, a piece that realigns to a segment boundary. An eager forward
    of a few tokens is bound by its launches (hundreds of kernels a layer), a graph step by the weights it reads.
    ``CODA_GQA_L_STEPPED_READ_TOKENS`` overrides the default (32; 0 sends every such piece through the forward): on an
    H100 a piece of 1 token read in 8.8 ms by steps against 55.9 ms by the forward, 32 tokens in 35.0 ms against 56.1,
    64 in 61.9 against 55.7 (SmolLM2 after 8K tokens, benchmarks/results/speed.md, "Short pieces by steps")."""
    raw = os.environ.get(STEPPED_READ_ENV, "").strip()
    if not raw:
        return DEFAULT_STEPPED_READ_TOKENS
    if not raw.isdigit():
        raise ValueError(f"{STEPPED_READ_ENV} must be a whole number (0 or more), got {raw!r}")
    return int(raw)


_SEPARATE_STEP_INPUTS = contextvars.ContextVar("coda_gqa_l_separate_step_inputs", default=False)


def separate_step_inputs() -> contextlib.AbstractContextManager[None]:
    """Inside, a graph decoder's plain step computes the gates' sigmoid, the window write and the queries' rotation
    as three kernels instead of ``step_inputs``' one (a graph captured inside keeps its choice): for the benchmark
    and tests that compare the two."""
    return _chosen(_SEPARATE_STEP_INPUTS, True)


def one_pass_step_inputs_allowed() -> bool:
    """Whether a plain graph step may take its attention inputs in one pass (``step_inputs``; the default)."""
    return not _SEPARATE_STEP_INPUTS.get()


# whether a graph decoder's one-token steps take kernels.step_products (the residual norms and the activation in
# their products' prologues): on, measured on an H100 on 2026-12-06 (benchmarks/results/speed.md, "Norms and the
# activation in the products' prologues"): SmolLM2's step 1.155x the separate kernels before cuBLAS
DEFAULT_STEP_PRODUCT_PROLOGUES = True
_STEP_PRODUCT_PROLOGUES: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "coda_gqa_l_step_product_prologues", default=None
)


def step_product_prologues(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, a graph decoder's one-token steps form each block's normalised input and the MLP's activation in the
    prologue of the product that reads them (``kernels.step_products``: three kernels fewer a layer), or with
    ``on=False`` keep the separate norm and activation kernels before cuBLAS; a graph captured inside keeps its
    choice. For the benchmark and tests that compare the two; outside, ``DEFAULT_STEP_PRODUCT_PROLOGUES`` (on)."""
    return _chosen(_STEP_PRODUCT_PROLOGUES, on)


def step_products_in_prologue(device: torch.device | str) -> bool:
    """Whether a one-token graph step on ``device`` takes ``kernels.step_products`` (``step_product_prologues``)."""
    chosen = _STEP_PRODUCT_PROLOGUES.get()
    return use_triton(device) and (DEFAULT_STEP_PRODUCT_PROLOGUES if chosen is None else chosen)


# whether a decode step's Triton kernels launch as programmatic dependents of the kernel before them (Hopper and
# later): each starts while the one before it finishes, loads what does not depend on it (its weights), and waits for
# it with ``griddepcontrol.wait`` before reading anything it wrote (``dependent_launch_meta``)
# on: measured on an H100 on 2026-12-06, SmolLM2's graph step 1.231x without them, the same greedy tokens
# (benchmarks/results/speed.md, "Dependent launches")
DEFAULT_DEPENDENT_LAUNCHES = True
_DEPENDENT_LAUNCHES: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "coda_gqa_l_dependent_launches", default=None
)
_CAPABILITIES: dict[int, tuple[int, int]] = {}


def dependent_launches(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, the decode step's kernels launch as programmatic dependents where the GPU has them (compute
    capability 9.0 or later), or with ``on=False`` one after another as usual; a graph captured inside keeps its
    choice. For the benchmark and tests that compare the two; outside, ``DEFAULT_DEPENDENT_LAUNCHES``."""
    return _chosen(_DEPENDENT_LAUNCHES, on)


def dependent_launch(device: torch.device | str) -> bool:
    """Whether a step kernel on ``device`` launches as a programmatic dependent (``dependent_launches``): CUDA with
    compute capability 9.0 or later, compiled (the interpreter has no such launch)."""
    chosen = _DEPENDENT_LAUNCHES.get()
    if not (DEFAULT_DEPENDENT_LAUNCHES if chosen is None else chosen):
        return False
    device = torch.device(device)
    if device.type != "cuda" or interpreting() or not triton_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index] >= (9, 0)


def dependent_launch_meta(device: torch.device | str) -> dict[str, bool]:
    """A step kernel's launch arguments for ``dependent_launch``: its ``PDL`` constexpr (the kernel waits for the
    kernel before it with ``gdc_wait`` before touching what that one writes, and lets the next one launch), and
    Triton's ``launch_pdl`` option where on (never passed to the interpreter)."""
    on = dependent_launch(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


DEFAULT_STEPS_AHEAD = True
_STEPS_AHEAD: contextvars.ContextVar[bool | None] = contextvars.ContextVar("coda_gqa_l_steps_ahead", default=None)


def steps_ahead(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, answer loops on a graph decoder launch each step before the host has read the token it follows and
    take it back if generation stopped there (``models.generation.DecodeSteps.ahead``), or with ``on=False`` wait
    for the token first, so the GPU idles while the host looks. For the benchmark and tests that compare the two;
    outside, ``DEFAULT_STEPS_AHEAD`` for a captured decoder's steps (on since the decoder's state is one
    allocation, so keeping it before a step is one copy: ``generate()`` took 0.776 ms a token with steps ahead
    against 0.805 without on an H100, 1.440 against 1.149 when it was 450 copies; benchmarks/results/speed.md)."""
    return _chosen(_STEPS_AHEAD, on)


def launch_steps_ahead(asynchronous: bool = True) -> bool:
    """Whether an answer loop launches its steps ahead (``steps_ahead``). Outside ``steps_ahead`` the default holds
    only for ``asynchronous`` steps (a captured graph's: the GPU runs while the host looks); an eager decoder's step
    runs before the call returns, so a step launched ahead would only be work to undo."""
    chosen = _STEPS_AHEAD.get()
    return DEFAULT_STEPS_AHEAD and asynchronous if chosen is None else chosen


# H100, 2026-12-06 (benchmarks/results/speed.md, "Key rows off the routing chain"): one 1,024-token chunk's routing
# 190.4 -> 143.0 us at the 7B shape, 123.8 -> 102.4 us for SmolLM2; the same banks and snapshots bit for bit
DEFAULT_KEY_FOLLOWERS = True
_KEY_FOLLOWERS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("coda_gqa_l_key_followers", default=None)


def key_followers(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, the routing kernel writes its banks' key rows in programs of their own that follow each bank's serial
    chain a segment behind (no decision reads a key, so they need not lengthen it), or with ``on=False`` inside
    the chain as before. For the benchmark and tests that compare the two; outside, ``DEFAULT_KEY_FOLLOWERS``."""
    return _chosen(_KEY_FOLLOWERS, on)


def routing_key_followers() -> bool:
    """Whether the routing kernel writes key rows in follower programs: ``key_followers`` inside it, else
    ``CODA_GQA_L_KEY_FOLLOWERS`` (1 or 0) where set, else ``DEFAULT_KEY_FOLLOWERS``."""
    return _on_off(_KEY_FOLLOWERS, KEY_FOLLOWERS_ENV, DEFAULT_KEY_FOLLOWERS)


def _on_off(flag: contextvars.ContextVar[bool | None], env: str, default: bool) -> bool:
    """A switch's value: ``flag`` where a block set it, else the environment variable ``env`` (1 or 0), else
    ``default``."""
    chosen = flag.get()
    if chosen is not None:
        return chosen
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"{env} must be 1 or 0, got {raw!r}")
    return raw == "1"


# H100, 2026-12-06/07 (benchmarks/results/speed.md, "Routing a chunk ahead"): the 7B layer's 32K prefill 15.17 ->
# 14.02 ms in one call, 23.05 / 19.18 ms in turn against 19.15 / 21.65 ahead alternating in another, 16.3 against
# 18.3-18.7 ms in a third: no gain beyond the noise. A chunk's glue (about 36 kernels under 20 us, issued at the
# host's pace) was hidden behind the routing kernel on one stream and is not once the kernel moves off it.
DEFAULT_ROUTING_AHEAD = False
_ROUTING_AHEAD: contextvars.ContextVar[bool | None] = contextvars.ContextVar("coda_gqa_l_routing_ahead", default=None)


def routing_ahead(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, a GPU ``prefill_chunked`` routes each chunk on a side stream while the chunk before attends (the
    routing kernel's serial chain keeps a few multiprocessors busy and leaves the rest to the attention), or with
    ``on=False`` routes and attends each chunk in turn. For the benchmark and tests that compare the two; outside,
    ``DEFAULT_ROUTING_AHEAD``."""
    return _chosen(_ROUTING_AHEAD, on)


def prefill_routes_ahead() -> bool:
    """Whether a GPU prefill routes a chunk ahead on a side stream: ``routing_ahead`` inside it, else
    ``CODA_GQA_L_ROUTING_AHEAD`` (1 or 0) where set, else ``DEFAULT_ROUTING_AHEAD``."""
    return _on_off(_ROUTING_AHEAD, ROUTING_AHEAD_ENV, DEFAULT_ROUTING_AHEAD)


# H100, 2026-12-07 (benchmarks/results/speed.md, "Larger chunks"): the 7B 32K prefill 9.24 ms with all multiprocessors,
# 9.40 with the carveout (9.44 with cuBLASLt asked for too), 9.18 through this switch in another process: no gain
DEFAULT_PRODUCT_CARVEOUT = False
_PRODUCT_CARVEOUT: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "coda_gqa_l_product_carveout", default=None
)


def product_carveout(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, a captured prefill whose routing runs beside its products captures them with cuBLAS told to plan for
    the multiprocessors the routing's programs leave (torch's SM carveout), or with ``on=False`` for them all. For the
    benchmark and tests that compare the two; outside, ``DEFAULT_PRODUCT_CARVEOUT``."""
    return _chosen(_PRODUCT_CARVEOUT, on)


def products_leave_routing_sms() -> bool:
    """Whether captured products beside the routing leave its multiprocessors out: ``product_carveout`` inside it,
    else ``CODA_GQA_L_PRODUCT_CARVEOUT`` (1 or 0) where set, else ``DEFAULT_PRODUCT_CARVEOUT``."""
    return _on_off(_PRODUCT_CARVEOUT, PRODUCT_CARVEOUT_ENV, DEFAULT_PRODUCT_CARVEOUT)


_chosen_float32_dots: list[Float32Dots | None] = [None]  # set_float32_dots's choice, process-wide


def set_float32_dots(mode: Float32Dots | None) -> None:
    """Chooses, for this process, how the attention kernels multiply float32 tiles on a GPU (``float32_dots``);
    ``None`` goes back to following torch's float32 matmul precision. ``CODA_GQA_L_FP32_DOTS`` still wins."""
    if mode is not None and mode not in FLOAT32_DOTS:
        raise ValueError(f"float32 dots must be one of {', '.join(FLOAT32_DOTS)}, got {mode!r}")
    _chosen_float32_dots[0] = mode


def float32_dots() -> Float32Dots:
    """``tl.dot``'s input precision for float32 tiles in the attention kernels on a GPU.

    ``ieee`` multiplies in float32 on the CUDA cores: exact as the float32 reference, but Triton unrolls each tile
    product into fused multiply-adds, and the forward's binary takes about 20 s to compile (a 3.9 MB cubin against
    0.3 MB in bfloat16; benchmarks/kernel_compiles.py, Triton 3.6). ``tf32x3`` splits each operand into two TF32
    parts and adds three tensor-core products (within float32's error rule: tests/kernels/test_diff_attention.py on a
    GPU) and compiles in about 4 s; ``tf32`` is one TF32 product (ten mantissa bits). In order: the environment
    variable ``CODA_GQA_L_FP32_DOTS``, ``set_float32_dots`` (the neural database on CUDA picks ``tf32x3``), then
    torch's ``get_float32_matmul_precision()`` (``highest``, torch's default: ``ieee``). The interpreter computes
    in float32 whatever is asked: ``ieee`` there."""
    if interpreting():
        return "ieee"
    forced = os.environ.get(FP32_DOTS_ENV, "").strip().lower()
    if forced:
        if forced not in FLOAT32_DOTS:
            raise ValueError(f"{FP32_DOTS_ENV} must be one of {', '.join(FLOAT32_DOTS)}, got {forced!r}")
        return forced  # type: ignore[return-value]
    chosen = _chosen_float32_dots[0]
    if chosen is not None:
        return chosen
    return _FROM_TORCH_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def float32_dots_forced() -> bool:
    """Whether ``CODA_GQA_L_FP32_DOTS`` is set (a caller's own choice then stands over a library's)."""
    return bool(os.environ.get(FP32_DOTS_ENV, "").strip())


def tile_size(n: int, least: int = 16) -> int:
    """Power-of-two tile size for ``n`` rows or columns, at least ``least`` (16: the smallest ``tl.dot`` tile)."""
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def use_triton(device: torch.device | str) -> bool:
    """Whether a kernel module runs its Triton kernel for tensors on ``device`` (else its reference)."""
    return backend(device) == "triton"


def autotune() -> bool:
    """Whether the Triton kernels autotune over block shapes: only when asked (``CODA_GQA_L_AUTOTUNE=1``), never in
    the interpreter. Off by default because tuning compiles every candidate shape first: on a fresh H200 the demo's
    first ingest took 154 s against 1.4 s in the next process (benchmarks/results/speed.md), while the attention
    kernel it tunes is 4% of an ingest chunk's device time."""
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "0") == "1"


def fused_bounded_chunk(device: torch.device | str) -> bool:
    """Whether the bounded layer reads a chunk with the fused kernels (routing in one launch per chunk,
    the fused attention) rather than the PyTorch reference (and its one-token decode view)."""
    return use_triton(device)


def graph_decode(device: torch.device | str) -> bool:
    """Whether answers decode through the whole model's CUDA graphs (``models.graph_decode``): on CUDA with the
    Triton kernels; ``CODA_GQA_L_KERNELS=torch`` decodes with the model's own forward instead."""
    return torch.device(device).type == "cuda" and use_triton(device)


def static_cache_kernel(device: torch.device | str) -> bool:
    """Whether a static-cache decode step (``BaselineGQA.step_static``) attends with the split decode kernel over the
    slots written so far, found from the position on the device (what a hand-written static-cache decoder does),
    rather than SDPA over every preallocated slot with a mask: that reads the whole cache each step, so at 128K the
    masked step ran 376 tokens/s against 3.69K for flash over exactly the written keys (7B layer, H100)."""
    return use_triton(device)


def unbounded_attention(
    device: torch.device | str, differential: bool, has_prefix: bool, padded: bool
) -> UnboundedAttention:
    """How unbounded attention runs for one call: ``sdpa`` (the fused RoPE and noise rotation, SDPA over
    the stacked queries, the fused combine), ``fused`` (one Triton kernel for both streams, the
    combine and the head norm) or ``reference`` (RoPE, SDPA per stream, the combine in PyTorch).

    The stacked SDPA path needs no cached prefix; the fused kernel takes no padding mask; plain GQA
    always runs the reference."""
    if not differential or not use_triton(device):
        return "reference"
    if not has_prefix and unbounded_path() == "sdpa":
        return "sdpa"
    return "reference" if padded else "fused"


def fused_combine(device: torch.device | str, differential: bool) -> bool:
    """Whether ``signal - lambda * noise``, the head norm and the cast run as one Triton pass
    (kernels/combine.py) after SDPA, rather than as PyTorch operations."""
    return differential and unbounded_path() == "sdpa" and use_triton(device)
