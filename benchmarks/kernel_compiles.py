"""Which Triton binaries the neural database's first request compiles on a GPU, and how long each takes to compile,
measured without a GPU: the first-request target of issue 19 (at most 10 s slower than the second) is missed (the
demo's first ingest 87.6 s against 3.1 s on an H100, benchmarks/results/speed.md), and this says how much of that
Triton's compiles can be.

    PYTHONPATH=src python benchmarks/kernel_compiles.py [--out DIR] [--arch 90] [--threads 16] \
        [--dtype float32|bfloat16] [--float32-dots ieee|tf32x3|tf32]
    PYTHONPATH=src python benchmarks/kernel_compiles.py --quick    # the tiny Llama: a smoke run (the test runs it)
    PYTHONPATH=/tmp/triton36:src python benchmarks/kernel_compiles.py   # with the device's Triton (3.6), installed
                                                 # by `pip install --no-deps --target /tmp/triton36 triton==3.6.0`

The database's model (SmolLM2 as the database runs it: float32 weights, folded, its float32 attention tiles
multiplied as the database on CUDA asks, ``--float32-dots``; ``--quick``: the tiny random Llama) goes
through what a first request runs, on the CPU with the package's Triton path switched on and every kernel launch
recorded instead of run (Triton's ``JITFunction.run`` patched; outputs stay uninitialised, as inside
``compile_ahead``): a document's first chunk and a second one through the graph decoder's step (``read sinks``,
``read``), a tail piece through the forward, a question through the forward, then decode steps across a segment
boundary (``refresh``, ``step``, ``route``). Each distinct binary (as Triton's JIT keys it: argument types, pointer
alignment and integer divisibility, constexprs, warps) is then compiled for the GPU architecture ``--arch`` (through
ptxas to a cubin, as on the device) into an empty cache: once one after another, timing each, and once all at once on
``--threads`` threads, as ``dispatch.compile_ahead`` does. The CPU and the Triton here are not the device's: the
figures are this machine's, and what they tell is each kernel's share and whether compiles on threads overlap. Not
counted: what Triton builds besides (older versions compile a C launcher per signature at a binary's first launch),
module loads, CUDA graph captures. Prints a table last; writes ``DIR/kernel_compiles.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":  # compiling needs Triton's real JIT, set before triton is imported
    sys.exit("kernel_compiles.py compiles kernels: unset TRITON_INTERPRET")
os.environ["CODA_GQA_L_KERNELS"] = "triton"  # the GPU's path, on the CPU (nothing runs: launches are recorded)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_header, write_result  # noqa: E402

from coda_gqa_l.differential import DifferentialCore  # noqa: E402
from coda_gqa_l.kernels import dispatch  # noqa: E402
from coda_gqa_l.models import BoundedCache  # noqa: E402
from coda_gqa_l.models.graph_decode import GraphModelDecoder  # noqa: E402
from coda_gqa_l.models.graph_prefill import start_states  # noqa: E402
from coda_gqa_l.models.hf_compat import cache_kwargs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Binary:
    """One distinct compile, as Triton's JIT keys it: a kernel's specialisation for a launch (argument types, pointer
    alignment and integer divisibility, constexprs) and its options (warps, stages)."""

    kernel: Any
    key: str
    source: Any  # triton's ASTSource, ready to compile
    options: Any  # the backend's parsed options
    phases: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cubin_bytes: int = 0

    @property
    def name(self) -> str:
        return str(self.kernel.fn.__name__)

    @property
    def constexprs(self) -> dict[str, str]:
        names = self.kernel.arg_names
        return {names[path[0]]: str(value) for path, value in self.source.constants.items()}


_BINDERS: dict[Any, Any] = {}


def describe(kernel: Any, args: tuple[Any, ...], meta: dict[str, Any], backend: Any) -> Binary:
    """The compile a launch of ``kernel`` asks for, found as ``JITFunction.run`` finds it (its binder and argument
    packing: Triton 3.9's, the version CI pins), for ``backend``'s target instead of a device's."""
    from triton import knobs
    from triton.compiler.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    meta = dict(meta)
    meta.setdefault("debug", kernel.debug or knobs.runtime.debug)  # the options JITFunction.run adds
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            meta.setdefault(name, getattr(knobs.compilation, name))
    binder = _BINDERS.get(kernel)
    if binder is None:
        binder = _BINDERS[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **meta)
    key = f"{kernel.fn.__name__}:{specialization}:{options}"
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound_args, specialization, options)
    return Binary(kernel, key, ASTSource(kernel, signature, constexprs, attrs), options)


@contextmanager
def recorded_launches(arch: int = 90) -> Iterator[Callable[[str], dict[str, Binary]]]:
    """Inside, Triton kernel launches are recorded (by the phase set with the yielded function) as compiles for
    ``sm_{arch}``, not run, and the package's dispatch takes its Triton path for CPU tensors."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    target_backend = make_backend(GPUTarget("cuda", arch, 32))
    binaries: dict[str, Binary] = {}
    phase = ["start"]

    def record(kernel: Any, *args: Any, grid: Any, warmup: bool, **meta: Any) -> None:
        binary = describe(kernel, args, meta, target_backend)
        binary = binaries.setdefault(binary.key, binary)
        if phase[0] not in binary.phases:
            binary.phases.append(phase[0])

    def set_phase(name: str) -> dict[str, Binary]:
        phase[0] = name
        return binaries

    run, backend, check = JITFunction.run, dispatch.backend, DifferentialCore.check_input
    # every launch (through dispatch.launch, autotuners and heuristics) ends in JITFunction.run; every backend choice
    # (use_triton and the named decisions) in dispatch.backend, looked up in dispatch's namespace at call time; the
    # layers' input check would refuse the unwritten outputs of the kernels before them
    JITFunction.run = record  # type: ignore[method-assign,assignment]
    dispatch.backend = lambda device: "triton"
    DifferentialCore.check_input = lambda self, x: None  # type: ignore[method-assign]
    try:
        yield set_phase
    finally:
        JITFunction.run = run  # type: ignore[method-assign]
        dispatch.backend = backend
        DifferentialCore.check_input = check  # type: ignore[method-assign]


def first_request(model: torch.nn.Module, segment: int, chunk: int, set_phase: Callable[[str], Any]) -> None:
    """What a database's first ingest and first answer launch, in order (CPU tensors, kernels recorded)."""
    base: Any = getattr(model, "model", model)
    ids = torch.randint(0, 100, (1, 2 * chunk + segment + 11))
    cache = BoundedCache(model, block_size=chunk)
    start_states(model, cache, 1)
    decoder = GraphModelDecoder(model, cache, capture=False)
    set_phase("ingest: read sinks")
    decoder.read(ids[:, :chunk])
    set_phase("ingest: read")
    decoder.read(ids[:, chunk : 2 * chunk])
    decoder.release()
    set_phase("ingest: tail forward")
    base(input_ids=ids[:, 2 * chunk :], **cache_kwargs(cache), use_cache=True)
    set_phase("answer: prompt forward")
    base(input_ids=ids[:, :9], **cache_kwargs(cache), use_cache=True)
    decoder = GraphModelDecoder(model, cache, capture=False)
    set_phase("answer: steps")
    token = ids[:, :1]
    for _ in range(segment + 2):  # crosses a segment boundary: refresh, step and route steps
        decoder(token)
    decoder.release()


def compile_binary(binary: Binary, arch: int) -> float:
    """Compile ``binary`` for ``sm_{arch}`` (to a cubin), note the cubin's size, and return the seconds it took."""
    import triton
    from triton.backends.compiler import GPUTarget

    began = time.perf_counter()
    compiled = triton.compile(binary.source, target=GPUTarget("cuda", arch, 32), options=binary.options.__dict__)
    seconds = time.perf_counter() - began
    binary.cubin_bytes = len(compiled.asm.get("cubin", b""))
    return seconds


@contextmanager
def empty_triton_cache() -> Iterator[None]:
    """A fresh Triton cache directory for the duration (so every compile is a compile, not a cache hit)."""
    import triton

    with tempfile.TemporaryDirectory(prefix="triton-cache-") as folder:
        knobs: Any = triton.knobs.cache
        before = knobs.dir
        knobs.dir = folder
        try:
            yield
        finally:
            knobs.dir = before


def model_and_chunk(quick: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.nn.Module, str, int, int]:
    """``load_model``'s model and label, its segment length and the chunk a first request reads (1,024 tokens; four
    segments for the tiny Llama)."""
    model, label = load_model(quick, dtype)
    segment = model.model.layers[0].self_attn.layer.config.segment  # type: ignore[union-attr,index]
    return model, label, segment, 4 * segment if quick else 1024


def load_model(quick: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.nn.Module, str]:
    name = str(dtype).removeprefix("torch.")
    if quick:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import tiny_bounded_llama

        return tiny_bounded_llama(seed=5, dtype=dtype), f"tiny random Llama (tests/helpers.py), {name}"
    from coda_gqa_l.models.pretrained import load_coda_smollm2

    model, _ = load_coda_smollm2(dtype=dtype, progress=False)
    return model, f"SmolLM2-135M-Instruct, shipped weights, folded (the neural database's model), {name}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kernel_compiles")
    p.add_argument("--arch", type=int, default=90, help="GPU architecture to compile for (90: H100/H200)")
    p.add_argument("--threads", type=int, default=16, help="threads for the compile-ahead row (the device's CPUs)")
    p.add_argument("--quick", action="store_true", help="the tiny Llama instead of SmolLM2 (a smoke run)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the model's dtype (float32: the database's, whose weights keep the CPU's dtype on a GPU)",
    )
    p.add_argument(
        "--float32-dots",
        choices=list(dispatch.FLOAT32_DOTS),
        default="tf32x3",
        help="how float32 attention tiles multiply (tf32x3: what the database on CUDA sets)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dispatch.set_float32_dots(args.float32_dots)
    model, label, segment, chunk = model_and_chunk(args.quick, dtype)
    if dtype == torch.float32:
        label += f", float32 dots {args.float32_dots}"
    with torch.inference_mode(), recorded_launches(args.arch) as set_phase:
        first_request(model, segment, chunk, set_phase)
        binaries = list(set_phase("done").values())
    with empty_triton_cache():
        for binary in binaries:
            binary.seconds = compile_binary(binary, args.arch)
    serial = sum(b.seconds for b in binaries)
    with empty_triton_cache(), ThreadPoolExecutor(args.threads) as pool:
        began = time.perf_counter()
        list(pool.map(lambda b: compile_binary(b, args.arch), binaries))
        threaded = time.perf_counter() - began
    result = run_header("kernel_compiles.py", argv if argv is not None else sys.argv[1:], torch.device("cpu"),
                        dtype)  # fmt: skip
    import triton

    result.update(
        model=label, arch=f"sm_{args.arch}", triton=triton.__version__, cpus=os.cpu_count(), threads=args.threads,
        serial_s=serial, threaded_s=threaded,
        binaries=[{"kernel": b.name, "constexprs": b.constexprs, "warps": b.options.num_warps,
                   "stages": b.options.num_stages, "phases": b.phases, "compile_s": b.seconds,
                   "cubin_bytes": b.cubin_bytes} for b in binaries],
    )  # fmt: skip
    table = [f"first-request compiles, {label}, sm_{args.arch}, Triton {triton.__version__}, {os.cpu_count()} CPUs"]
    table.append(f"{'kernel':32} {'compile s':>9} {'cubin KiB':>9}  phases")
    for b in sorted(binaries, key=lambda b: -b.seconds):
        table.append(f"{b.name:32} {b.seconds:9.2f} {b.cubin_bytes / 1024:9.0f}  {', '.join(b.phases)}")
    table.append(f"{len(binaries)} binaries: {serial:.1f} s one after another, {threaded:.1f} s on {args.threads} "
                 "threads")  # fmt: skip
    write_result(result, args.out / "kernel_compiles.json", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
