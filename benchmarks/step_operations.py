"""How many operations a graph step of the neural database's model launches per layer, counted on the CPU: PyTorch
operators (views and no-op conversions left out) and Triton kernels, for a 1,024-token chunk read and for a plain
decode step. A step under a CUDA graph is launch-bound on a small model (an ingest chunk was 1,065 launches on an
H200), so fewer operations per layer is what the glue kernels are for; this counts them without a GPU.

    PYTHONPATH=src python benchmarks/step_operations.py [--out DIR]
    PYTHONPATH=src python benchmarks/step_operations.py --quick    # the tiny Llama: a smoke run (the test runs it)
    PYTHONPATH=src python benchmarks/step_operations.py --layer 4096 32 8 [--fold]   # one layer's CapturedDecoder

``--layer D H HKV`` counts instead one bounded layer (medium config, bfloat16) stepped by ``decode.CapturedDecoder``,
the suite's decode path, per step kind after a 512-token prefill: the step that routes and a plain step, whole
(its copies in and out included); ``--fold`` first fuses the layer's input projections, as the database does.

The model runs with the package's Triton path switched on and every kernel launch recorded instead of run (as in
``kernel_compiles.py``), so the counts are the GPU path's; each PyTorch operator counted is a top-level ``aten``
call that is not a view, an allocation or a conversion to the tensor's own dtype (those launch nothing). A CUDA
operator may launch more than one kernel (a product with a bias), so these are lower bounds on the GPU's launches.
Prints a table last; writes ``DIR/step_operations.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_header, write_result  # noqa: E402
from kernel_compiles import model_and_chunk, recorded_launches  # noqa: E402  (sets the Triton path first)

from coda_gqa_l.models import BoundedCache  # noqa: E402
from coda_gqa_l.models.graph_decode import GraphModelDecoder  # noqa: E402
from coda_gqa_l.models.graph_prefill import start_states  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# launch nothing on a GPU: views, allocations, dtype queries, same-dtype conversions (counted apart when they copy)
SILENT = {"view", "reshape", "slice", "select", "unsqueeze", "expand", "as_strided", "t", "transpose", "permute",
          "split", "chunk", "narrow", "squeeze", "empty", "empty_like", "detach", "alias", "split_with_sizes",
          "_unsafe_view", "lift_fresh", "unbind", "empty_strided", "result_type", "promote_types", "to"}  # fmt: skip


def top_level_operators(run: Callable[[], object]) -> Counter[str]:
    """The top-level ``aten`` operators ``run()`` calls (an operator inside another is the outer one's work), and
    ``_to_copy`` wherever a conversion really copies."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts: Counter[str] = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        name = event.name.removeprefix("aten::")
        parent, nested = event.cpu_parent, False
        while parent is not None and not nested:
            nested = parent.name.startswith("aten::") and parent.name != "aten::to"
            parent = parent.cpu_parent
        if name == "_to_copy" or not nested and name not in SILENT:
            counts[name] += 1
    return counts


def counted(run: Callable[[], object]) -> tuple[Counter[str], Counter[str]]:
    """The top-level PyTorch operators and the Triton kernels ``run()`` launches (inside ``recorded_launches``)."""
    from triton.runtime.jit import JITFunction

    launches: Counter[str] = Counter()
    recorder = JITFunction.run

    def counting(kernel: Any, *args: Any, **kwargs: Any) -> None:
        launches[kernel.fn.__name__] += 1
        recorder(kernel, *args, **kwargs)

    JITFunction.run = counting  # type: ignore[method-assign,assignment]
    try:
        operators = top_level_operators(run)
    finally:
        JITFunction.run = recorder  # type: ignore[method-assign]
    return operators, launches


def counted_row(run: Callable[[], object], layers: int) -> dict[str, Any]:
    """``counted(run)`` as a result row, per layer."""
    operators, launches = counted(run)
    return {
        "pytorch_per_layer": sum(operators.values()) / layers,
        "triton_per_layer": sum(launches.values()) / layers,
        "pytorch": dict(operators.most_common()),
        "triton": dict(launches.most_common()),
    }


def measure(model: torch.nn.Module, chunk: int) -> dict[str, Any]:
    """Operations per layer of a chunk read (after two chunks) and of a plain decode step (after a routing one)."""
    layers = len(model.model.layers)  # type: ignore[union-attr,arg-type]
    ids = torch.randint(0, 100, (1, 3 * chunk))
    token = ids[:, :1]
    rows: dict[str, Any] = {}
    with torch.inference_mode(), recorded_launches():
        cache = BoundedCache(model, block_size=chunk)
        start_states(model, cache, 1)
        decoder = GraphModelDecoder(model, cache, capture=False)
        decoder.read(ids[:, : 2 * chunk])
        rows["chunk read"] = counted_row(lambda: decoder.read(ids[:, 2 * chunk :]), layers)
        decoder(token)  # the segment-starting step: the next one is plain
        rows["plain step"] = counted_row(lambda: decoder(token), layers)
    return rows


def measure_layer(embed_dim: int, heads: int, kv_heads: int, fold: bool) -> dict[str, Any]:
    """Operations of one bounded layer's ``CapturedDecoder`` steps (eager, kernels recorded): a routing step at a
    segment start, then a plain step inside the segment."""
    from coda_gqa_l import BoundedCoDAAttention, BoundedConfig
    from coda_gqa_l.decode import CapturedDecoder

    torch.manual_seed(0)
    layer = BoundedCoDAAttention(embed_dim, heads, kv_heads, config=BoundedConfig.preset("medium")).bfloat16()
    if fold and not layer.fuse_input_projections():
        raise SystemExit("--fold: the layer's input projections could not be fused")
    token = torch.randn(1, 1, embed_dim, dtype=torch.bfloat16)
    rows: dict[str, Any] = {}
    with recorded_launches():
        with torch.inference_mode():
            prompt = torch.randn(1, 512, embed_dim, dtype=torch.bfloat16)
            _, state = layer.prefill_chunked(prompt, layer.init_state(1), block_size=512, return_outputs=False)
        decoder = CapturedDecoder(layer, state, capture=False)
        for name in ("routing step", "plain step"):  # 512 starts a segment; 513 reads the extras it kept
            rows[name] = counted_row(lambda: decoder(token), 1)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "step_operations")
    p.add_argument("--quick", action="store_true", help="the tiny Llama instead of SmolLM2 (a smoke run)")
    p.add_argument("--layer", type=int, nargs=3, metavar=("D", "H", "HKV"), help="one bounded layer of this shape")
    p.add_argument("--fold", action="store_true", help="with --layer: fuse the input projections first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.layer:
        rows = measure_layer(*args.layer, fold=args.fold)
        label, layers = f"one bounded layer D={args.layer[0]} H={args.layer[1]} Hkv={args.layer[2]}", 1
        label += ", input projections fused" if args.fold else ""
        name = "step_operations_layer.json"
    else:
        model, label, _, chunk = model_and_chunk(args.quick)
        rows = measure(model, chunk)
        layers, name = len(model.model.layers), "step_operations.json"  # type: ignore[union-attr,arg-type]
    result = run_header("step_operations.py", argv if argv is not None else sys.argv[1:], torch.device("cpu"),
                        torch.bfloat16)  # fmt: skip
    result.update(model=label, steps=rows)
    table = [f"operations per layer, {label} (the GPU path, counted on the CPU)"]
    table.append(f"{'step':12} {'PyTorch':>8} {'Triton':>7}  most frequent PyTorch operators")
    for step, row in rows.items():
        common = ", ".join(f"{op} {n / layers:.1f}" for op, n in list(row["pytorch"].items())[:4])
        table.append(f"{step:12} {row['pytorch_per_layer']:8.1f} {row['triton_per_layer']:7.1f}  {common}")
    write_result(result, args.out / name, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
