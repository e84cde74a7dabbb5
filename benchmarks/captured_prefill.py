"""A bounded layer's GPU prefill through ``CapturedPrefill`` (one graph replay a chunk, its routing pipelined in
pieces on side streams) against its eager ``prefill_chunked`` and the bare GQA layer, in one run.

    PYTHONPATH=src python benchmarks/captured_prefill.py [--lengths 2048 32768] [--pieces 1 2 4 8] [--out DIR]
        [--settings default "routing 4 warps" "keys in chains" "stacking pass"] [--weights 1,4,1 1,3]

One 7B-shaped bfloat16 layer (``medium`` banks) prefills random tokens of each length from a fresh state. Every
variant is timed in rounds that visit the variants in turn (CUDA events around each call; medians over the rounds),
so drift of the GPU's clock falls on all of them alike: bare GQA (projections, RoPE, SDPA), the eager prefill in
chunks of ``--chunk``, and the captured prefill with each ``--pieces`` count. Then one profiled call of each
captured variant: the kernels grouped (routing, attention, products, the rest), the time routing runs with no
other kernel, the profiled span, and the kernels by name (``--kernels-of``: which variant's to print). Prints a
table, writes ``captured_prefill.json`` to ``--out``.

``captured, 2 pieces, no state`` is ``prefill(x)``: a fresh state made inside, without ``layer.init_state`` or a
copy in before the graph (the other captured variants take ``layer.init_state(1)``, as a caller who holds a state).

``--weights`` adds captured variants whose pieces have those relative sizes (``CapturedPrefill(weights=...)``; one
piece a weight, whole segments each): a small first piece starts the routing sooner, a small last one shortens
what waits for the last routing.

``--settings`` adds captured variants that run otherwise (each with every ``--pieces`` count; graphs captured and
replayed under the setting): ``routing 4 warps`` the routing kernel at 4 warps a program instead of 8, ``keys in
chains`` with no key follower programs (``dispatch.key_followers(False)``: 16 programs at the 7B shape instead of 32,
each chain longer), ``no routing`` the routing kernel left out (timing only: wrong outputs; what routing costs the
prefill, its launch beside the other kernels included, is the difference), ``stacking pass`` RoPE and the noise
rotation in a pass that writes the stacked queries before the attention forward
(``diff_attention.ROTATE_IN_FORWARD`` off; the default rotates in the forward's prologue). Beside the routing the
products run on the multiprocessors its programs leave (it holds one each for the whole chain), so a longer chain on
fewer multiprocessors can be the faster prefill. ``no routing`` needs two or more pieces (a side stream). ``main
first`` captures on a high-priority stream (the products and attention's programs dispatched before waiting routing
programs), ``routing first`` runs the routing on high-priority streams. ``carveout`` captures the products with
torch's SM carveout set to the routing's 32 programs (cuBLAS plans them for the other multiprocessors), ``carveout
lt`` with cuBLASLt asked for as well.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_gqa import BareGQA  # noqa: E402
from bench_common import routing_left_out, time_once_ms  # noqa: E402
from prefill_timeline import profile_groups  # noqa: E402

import coda_gqa_l.captured_prefill as captured_module  # noqa: E402
import coda_gqa_l.decode as decode_module  # noqa: E402
from coda_gqa_l import BoundedCoDAAttention, BoundedConfig  # noqa: E402
from coda_gqa_l.captured_prefill import CapturedPrefill  # noqa: E402
from coda_gqa_l.differential import finite_checked_upstream  # noqa: E402
from coda_gqa_l.kernels import diff_attention, dispatch  # noqa: E402
from coda_gqa_l.kernels import routing as routing_kernel  # noqa: E402

# the chunk CapturedPrefill takes by default (``--chunk``)
_DEFAULT_CHUNK = inspect.signature(CapturedPrefill.__init__).parameters["chunk"].default

SETTINGS = (
    "default", "routing 4 warps", "keys in chains", "stacking pass", "no routing", "main first", "routing first",
    "carveout", "carveout lt",
)  # fmt: skip
CARVEOUT = 32  # the 7B layer's routing programs: 8 KV heads x (2 chains + 2 key followers)
_PRIORITY_STREAMS: dict[str, Any] = {}


def _priority_stream(name: str) -> Any:
    """A high-priority CUDA stream, one per use, made once."""
    if name not in _PRIORITY_STREAMS:
        _, high = torch.cuda.Stream.priority_range()
        _PRIORITY_STREAMS[name] = [torch.cuda.Stream(priority=high) for _ in range(8)]
    return _PRIORITY_STREAMS[name]


@contextmanager
def setting(name: str) -> Iterator[None]:
    """The kernels launched as ``name`` says while inside (``--settings``)."""
    if name == "keys in chains":
        with dispatch.key_followers(False):
            yield
        return
    if name in ("main first", "routing first"):
        # stream priorities, where the capture keeps them in the graph's kernel nodes: the block scheduler dispatches
        # a higher-priority kernel's waiting programs first; "main first" raises the capture stream's (the products,
        # attention), "routing first" the routing streams'
        patched, attribute = (
            (decode_module, "capture_stream") if name == "main first" else (captured_module, "routing_streams")
        )
        original = getattr(patched, attribute)
        if name == "main first":
            setattr(patched, attribute, lambda device: _priority_stream(name)[0])
        else:
            setattr(patched, attribute, lambda device, count: _priority_stream(name)[:count])
        try:
            yield
        finally:
            setattr(patched, attribute, original)
        return
    if name in ("carveout", "carveout lt"):
        # cuBLAS told to plan its products for the multiprocessors the routing leaves (torch's SM carveout; its reason:
        # products planned for every multiprocessor beside a kernel that holds some run a second wave; on an H100 it
        # gained nothing here, results/speed.md); "carveout lt" also asks for cuBLASLt, whose matmul descriptor
        # carries the carveout in torch's source
        backend = torch.backends.cuda.preferred_blas_library()
        torch._C._set_sm_carveout_experimental(CARVEOUT)
        if name == "carveout lt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            yield
        finally:
            torch._C._set_sm_carveout_experimental(None)
            torch.backends.cuda.preferred_blas_library(backend)
        return
    if name == "no routing":  # timing only: the banks never change and the snapshots are left unwritten
        with routing_left_out():
            yield
        return
    warps, rotate = routing_kernel._WARPS, diff_attention.ROTATE_IN_FORWARD
    if name == "routing 4 warps":
        routing_kernel._WARPS = 4
    if name == "stacking pass":
        diff_attention.ROTATE_IN_FORWARD = False
    try:
        yield
    finally:
        routing_kernel._WARPS, diff_attention.ROTATE_IN_FORWARD = warps, rotate


def _weights(text: str) -> tuple[int, ...]:
    """``--weights``: "1,4,1" as (1, 4, 1), positive ints."""
    try:
        weights = tuple(int(part) for part in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) < 2 or min(weights) <= 0:
        raise argparse.ArgumentTypeError(f"weights must be two or more positive ints separated by commas, got {text!r}")
    return weights


def _takes_no_state() -> bool:
    """Whether this ``CapturedPrefill`` starts a fresh state from ``state=None`` (an earlier src, timed beside, may
    not): the variant ``..., no state`` times it."""
    return inspect.signature(CapturedPrefill.prefill).parameters["state"].default is None


def kernels_by_name(run: Callable[[], object], top: int = 14) -> list[dict[str, Any]]:
    """The ``top`` kernel names of one profiled call by summed device time: count, sum and mean."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    sums: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            sums.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
    ranked = sorted(sums.items(), key=lambda item: -sum(item[1]))[:top]
    return [{"name": k, "count": len(v), "sum_ms": sum(v) / 1e3, "mean_us": sum(v) / len(v)} for k, v in ranked]


def seven_b_layer() -> BoundedCoDAAttention:
    """The 7B-shaped bfloat16 layer with ``medium`` banks these benchmarks time, on CUDA, seeded."""
    torch.manual_seed(0)
    config = BoundedConfig(window=256, num_landmarks_exact=64, num_landmarks_summary=64)
    with torch.device("cuda"):
        return BoundedCoDAAttention(4096, 32, 8, head_dim=128, config=config).to(torch.bfloat16).eval()


def _under(how: str, prefill: CapturedPrefill, x: torch.Tensor, state: Any) -> object:
    with setting(how):
        return prefill(x, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--chunk", type=int, default=_DEFAULT_CHUNK, help="tokens a captured step takes")
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=["default"],
                        help="how the captured variants' kernels run, each a variant")  # fmt: skip
    parser.add_argument("--weights", nargs="*", default=[], type=_weights,
                        help="uneven pieces, each comma-separated relative sizes (1,4,1), a variant each")  # fmt: skip
    parser.add_argument("--kernels-of", default="captured, 2 pieces", help="the variant whose kernels to list")
    parser.add_argument("--trace", action="store_true",
                        help="write that variant's profiled call at each length as a Chrome trace "
                             "(captured_prefill_trace_LENGTH.json in --out; benchmarks/trace_gaps.py)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    layer = seven_b_layer()
    with torch.device("cuda"):
        bare = BareGQA(4096, 32, 8, 128).to(torch.bfloat16).eval()
    captured: dict[tuple[int | tuple[int, ...], str], CapturedPrefill] = {
        (p, how): CapturedPrefill(layer, chunk=args.chunk, pieces=p) for how in args.settings for p in args.pieces
    }
    for weights in args.weights:
        captured[(weights, "default")] = CapturedPrefill(layer, chunk=args.chunk, pieces=len(weights), weights=weights)
    rows: list[dict[str, Any]] = []
    # as the suite times layers: inside a model the adapter tests the input for NaN and Inf once, so the layer's own
    # test (a read of the input and a host synchronisation a call) is left out for every variant
    with torch.inference_mode(), finite_checked_upstream():
        for length in args.lengths:
            x = torch.randn(1, length, 4096, device="cuda", dtype=torch.bfloat16)
            variants: dict[str, Callable[[], object]] = {
                "bare GQA": lambda x=x: bare(x),
                "eager prefill_chunked": lambda x=x: layer.prefill_chunked(x, layer.init_state(1), args.chunk),
            }
            for (p, how), prefill in captured.items():
                if isinstance(p, tuple):  # --weights
                    name = f"captured, {len(p)} pieces {':'.join(map(str, p))}"
                else:
                    name = f"captured, {p} piece{'s' if p > 1 else ''}" + ("" if how == "default" else f", {how}")
                variants[name] = lambda x=x, f=prefill, how=how: _under(how, f, x, layer.init_state(1))
                if p == 2 and how == "default" and _takes_no_state():
                    variants[name + ", no state"] = lambda x=x, f=prefill: f(x)
            memory: dict[str, tuple[float, float]] = {}
            for name, run in variants.items():  # compiles, captures, warms the allocator
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run()
                run()
                torch.cuda.synchronize()
                # what the variant keeps between calls (static buffers, graph pools) and the most a call held
                held = (torch.cuda.memory_allocated() - before) / 2**20
                memory[name] = (held, (torch.cuda.max_memory_allocated() - before) / 2**20)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, run in variants.items():
                    times[name].append(time_once_ms(run, "cuda"))
            bare_ms = statistics.median(times["bare GQA"])
            for name, run in variants.items():
                median = statistics.median(times[name])
                row = {"length": length, "variant": name, "median_ms": median, "times_ms": times[name],
                       "tokens_per_s": length / median * 1e3, "against_bare": bare_ms / median,
                       "held_mib": memory[name][0], "peak_mib": memory[name][1]}  # fmt: skip
                if name.startswith("captured") or name.startswith("eager"):
                    trace = (
                        args.out / f"captured_prefill_trace_{length}.json"
                        if args.trace and name == args.kernels_of
                        else None
                    )
                    if trace is not None:
                        args.out.mkdir(parents=True, exist_ok=True)
                    row |= profile_groups(run, trace)
                    row.pop("kernel_names", None)
                    row["by_name"] = kernels_by_name(run)
                rows.append(row)
            del x
    device = torch.cuda.get_device_name()
    print(f"7B layer, medium banks, bf16, batch 1, chunks of {args.chunk:,}; {device}; {args.rounds} rounds")
    print("| tokens | variant | median ms | tok/s | x bare GQA | kernels | routing sum ms | routing alone ms | "
          "attention ms | products ms | other ms | span ms | held MiB | peak MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tps = f"{r['tokens_per_s'] / 1e6:.3f}M"
        if "span_ms" in r:
            count = sum(r[g]["kernels"] for g in ("routing", "attention", "products", "other"))
            rest = (f"{count} | {r['routing']['sum_ms']:.2f} | {r['routing_alone_ms']:.2f} | "
                    f"{r['attention']['sum_ms']:.2f} | {r['products']['sum_ms']:.2f} | {r['other']['sum_ms']:.2f} | "
                    f"{r['span_ms']:.2f}")  # fmt: skip
        else:
            rest = " | ".join([""] * 7)
        rest += f" | {r['held_mib']:.0f} | {r['peak_mib']:.0f}"
        print(f"| {r['length']:,} | {r['variant']} | {r['median_ms']:.3f} | {tps} | {r['against_bare']:.3f} | {rest} |")
    for r in rows:
        if r["variant"] == args.kernels_of:
            print(f"\n{r['variant']}, {r['length']:,} tokens: kernels by summed time (count, sum ms, mean us)")
            for k in r["by_name"]:
                print(f"  {k['count']:>5} {k['sum_ms']:>8.3f} {k['mean_us']:>9.1f}  {k['name']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "captured_prefill.json"
    meta = {"device": device, "torch": torch.__version__, "chunk": args.chunk, "rounds": args.rounds}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
