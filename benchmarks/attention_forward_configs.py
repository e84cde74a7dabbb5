"""Block shapes of the fused differential attention forward, timed inside the captured prefill of a 7B-shaped layer.

    PYTHONPATH=src python benchmarks/attention_forward_configs.py [--lengths 2048 32768] [--out DIR]

The shipped forward (``kernels.diff_attention``: ``_fwd_blocks`` BLOCK_M 64, BLOCK_N 64, 8 warps and 2 stages at head
size 128; ``STREAMS_AS_ROWS``, on) is replaced, for one ``CapturedPrefill`` (graphs captured anew) of a
bfloat16 layer with ``medium`` banks, by each candidate: BLOCK_M, BLOCK_N, warps, stages, a register cap, and the two
streams as the rows of one tile or as two tiles. For each: the prefill's median time over rounds that visit the
candidates in turn, the forward kernel's summed time in one profiled call, and the largest difference of its outputs
from the first candidate's (bfloat16 rounding: a tile shape changes the order of the sums). Prints a table, writes
``attention_forward_configs_<layer>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import time_once_ms  # noqa: E402
from captured_prefill import seven_b_layer  # noqa: E402

import coda_gqa_l.kernels.diff_attention as diff_attention  # noqa: E402
from coda_gqa_l import BoundedCoDAAttention, BoundedConfig  # noqa: E402
from coda_gqa_l.captured_prefill import CapturedPrefill  # noqa: E402
from coda_gqa_l.differential import finite_checked_upstream  # noqa: E402

# (BLOCK_M, BLOCK_N, warps, stages, register cap, streams as rows); stages None: Triton's default, cap None: none
# (ptxas takes 255 a thread: one block a multiprocessor at 8 warps); streams as rows: both streams' queries the rows
# of one tile (``diff_attention.STREAMS_AS_ROWS``), else two tiles. The first is the shipped shape. Shared memory at
# sm_90 (ptxas -v, 8 warps): 3 stages 131.6 KB, 2 stages 98.6 KB.
Candidate = tuple[int, int, int, int | None, int | None, bool]
CANDIDATES: list[Candidate] = [
    (64, 64, 8, 2, None, True),  # the shipped shape and layout (streams as rows)
    (64, 64, 8, None, None, False),  # shipped until 2026-12-07 (two tiles)
    (64, 64, 8, None, None, True),
    (64, 64, 8, 2, 128, True),  # two blocks a multiprocessor
    (64, 128, 8, 2, None, True),
    (32, 64, 4, 3, None, True),  # one warp group
]
# head size 64 (SmolLM2's): the shipped 8 warps and rows first, then 4 warps (shipped with two tiles until 2026-12-07)
CANDIDATES_64: list[Candidate] = [
    (64, 64, 8, None, None, True),
    (64, 64, 4, None, None, False),
    (64, 64, 4, None, None, True),
    (64, 64, 8, None, None, False),
    (32, 64, 4, None, None, True),
]


def smollm2_layer() -> BoundedCoDAAttention:
    """A SmolLM2-360M-shaped bfloat16 layer (960 wide, 15 query heads over 5 KV heads of 64) with ``medium`` banks."""
    torch.manual_seed(0)
    config = BoundedConfig(window=256, num_landmarks_exact=64, num_landmarks_summary=64)
    with torch.device("cuda"):
        return BoundedCoDAAttention(960, 15, 5, head_dim=64, config=config).to(torch.bfloat16).eval()


@contextmanager
def forward_shape(
    block_m: int, block_n: int, warps: int, stages: int | None, maxnreg: int | None, streams_as_rows: bool
) -> Iterator[None]:
    """The forward launched with this shape while inside."""
    blocks, launch, rows = diff_attention._fwd_blocks, diff_attention.launch, diff_attention.STREAMS_AS_ROWS

    def capped(kernel: Any, grid: Any, *args: Any, **meta: Any) -> None:
        if maxnreg is not None and meta.get("BLOCK_M") == block_m and "DIFF" in meta and "STORE_STREAMS" in meta:
            meta = {**meta, "maxnreg": maxnreg}
        launch(kernel, grid, *args, **meta)

    diff_attention._fwd_blocks = lambda head_dim: (block_m, block_n, warps, stages)  # type: ignore[assignment]
    diff_attention.launch = capped  # type: ignore[assignment]
    diff_attention.STREAMS_AS_ROWS = streams_as_rows
    try:
        yield
    finally:
        diff_attention._fwd_blocks, diff_attention.launch = blocks, launch  # type: ignore[assignment]
        diff_attention.STREAMS_AS_ROWS = rows


def forward_kernel_ms(run: Callable[[], object]) -> float:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA
               and e.name == "_fwd_kernel") / 1e3  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--layer", choices=["7B", "SmolLM2"], default="7B", help="the layer's shape (head size 128 or 64)"
    )
    parser.add_argument("--first", type=int, default=None, help="only the first N candidates (device time)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    layer = seven_b_layer() if args.layer == "7B" else smollm2_layer()
    candidates = (CANDIDATES if args.layer == "7B" else CANDIDATES_64)[: args.first]
    rows: list[dict[str, Any]] = []
    with torch.inference_mode(), finite_checked_upstream():
        for length in args.lengths:
            x = torch.randn(1, length, layer.embed_dim, device="cuda", dtype=torch.bfloat16)
            runs: dict[Candidate, Callable[[], Any]] = {}
            outputs: dict[Candidate, torch.Tensor] = {}
            failed: dict[Candidate, str] = {}
            for shape in candidates:
                prefill = CapturedPrefill(layer)
                run = lambda x=x, f=prefill, s=shape: _shaped(s, lambda: f(x, layer.init_state(1)))  # noqa: E731
                try:
                    outputs[shape] = run()[0].float()
                    run()
                    runs[shape] = run
                except Exception as error:  # a shape that does not compile (shared memory, registers) is reported
                    failed[shape] = f"{type(error).__name__}: {str(error)[:160]}"
            times: dict[Any, list[float]] = {shape: [] for shape in runs}
            for _ in range(args.rounds):
                for shape, run in runs.items():
                    times[shape].append(time_once_ms(run, "cuda"))
            shipped = outputs.get(candidates[0])
            for shape in candidates:
                row: dict[str, Any] = {"length": length, "block_m": shape[0], "block_n": shape[1],
                                       "warps": shape[2], "stages": shape[3], "maxnreg": shape[4],
                                       "streams_as_rows": shape[5]}  # fmt: skip
                if shape in failed:
                    rows.append(row | {"error": failed[shape]})
                    continue
                row["median_ms"] = statistics.median(times[shape])
                row["forward_kernel_ms"] = forward_kernel_ms(runs[shape])
                if shipped is not None:
                    row["max_abs_diff"] = (outputs[shape] - shipped).abs().max().item()
                rows.append(row)
            del x, outputs
    device = torch.cuda.get_device_name()
    print(f"{args.layer} layer, medium banks, bf16, CapturedPrefill (chunks of 4,096, 2 pieces); {device}; "
          f"{args.rounds} rounds")  # fmt: skip
    print(
        "| tokens | BLOCK_M | BLOCK_N | warps | stages | reg. cap | streams | prefill ms | forward ms | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = (f"| {r['length']:,} | {r['block_m']} | {r['block_n']} | {r['warps']} | {r['stages'] or 'default'} | "
                 f"{r['maxnreg'] or 'none'} | {'rows' if r['streams_as_rows'] else 'tiles'} |")  # fmt: skip
        if "error" in r:
            print(f"{shape} {r['error']} | | |")
        else:
            print(f"{shape} {r['median_ms']:.3f} | {r['forward_kernel_ms']:.3f} | {r.get('max_abs_diff', 0):.3g} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"attention_forward_configs_{args.layer}.json"
    path.write_text(json.dumps({"meta": {"device": device, "torch": torch.__version__}, "rows": rows}, indent=1))
    print(f"wrote {path}")


def _shaped(shape: Candidate, run: Callable[[], Any]) -> Any:
    with forward_shape(*shape):
        return run()


if __name__ == "__main__":
    main()
