"""Registers and spills of the fused routing kernel, compiled for a GPU on the CPU: the register kernel keeps each bank
in registers across a chunk's segments, and whether its tiles fit decides which dtype may use it
(``dispatch.routing_bank_for``). No GPU needed: each launch is recorded as ``kernel_compiles.py`` records them, compiled
to PTX for ``sm_{arch}`` and assembled by Triton's own ``ptxas -v``, whose report is read.

    PYTHONPATH=/tmp/triton36:src python benchmarks/routing_registers.py [--out DIR] [--arch 90] [--float32-dots ieee]
        # with the device's Triton (3.6): pip install --no-deps --target /tmp/triton36 triton==3.6.0

Rows: SmolLM2 in the neural database's config and the 7B layer in the medium preset (``routing_kernel.py``'s shapes),
each bank alone (the launch's registers are those of its larger program), bfloat16 and float32, the bank in registers
and in memory. Spill bytes are ``ptxas``'s static count of spill instructions' bytes, not traffic. Prints a table last;
writes ``DIR/routing_registers.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("routing_registers.py compiles kernels: unset TRITON_INTERPRET")
os.environ["CODA_GQA_L_KERNELS"] = "triton"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_result  # noqa: E402
from kernel_compiles import empty_triton_cache, recorded_launches  # noqa: E402
from routing_kernel import SHAPES, Shape  # noqa: E402

from coda_gqa_l.kernels import dispatch  # noqa: E402
from coda_gqa_l.kernels.routing import route_chunk_triton  # noqa: E402
from coda_gqa_l.state import Banks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BANKS = {
    "exact": lambda c: replace(c, num_landmarks_summary=0),
    "summary": lambda c: replace(c, num_landmarks_exact=0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "routing_registers")
    p.add_argument("--arch", type=int, default=90, help="GPU architecture to compile for (90: H100/H200)")
    p.add_argument("--float32-dots", choices=["ieee", "tf32x3"], default="ieee", help="float32 tiles' dots")
    return p.parse_args(argv)


def empty_banks(shape: Shape, config: Any, dtype: torch.dtype) -> Banks:
    h, d, me, ms = shape.kv_heads, shape.head_dim, config.num_landmarks_exact, config.num_landmarks_summary

    def rows(m: int) -> torch.Tensor:
        return torch.zeros(1, h, m, d, dtype=dtype)

    return Banks(
        rows(me), rows(me), torch.ones(1, h, me), torch.zeros(1, h, me, dtype=torch.long),
        torch.zeros(1, h, me, dtype=torch.bool), rows(ms), rows(ms), torch.ones(1, h, ms),
        torch.zeros(1, h, ms, dtype=torch.bool),
    )  # fmt: skip


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill bytes of the kernel in ``ptx``, as Triton's ``ptxas -v`` reports them."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", f"sm_{arch}a", str(source), "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
    }


def compile_row(shape: Shape, bank: str, dtype: torch.dtype, where: str, arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget

    config = BANKS[bank](shape.config)
    h, d, n = shape.kv_heads, shape.head_dim, shape.chunk
    ext = torch.zeros(1, h, config.window + n, d, dtype=dtype)
    with recorded_launches(arch) as set_phase, dispatch.routing_bank(where):  # type: ignore[arg-type]
        route_chunk_triton(
            empty_banks(shape, config, dtype), ext, ext.clone(), torch.zeros(1, h, config.window + n),
            start=8 * n, n=n, eta=torch.full((h,), 0.1), config=config,
        )  # fmt: skip
        (binary,) = set_phase("done").values()
    with empty_triton_cache():
        compiled = triton.compile(binary.source, target=GPUTarget("cuda", arch, 32), options=binary.options.__dict__)
    report = ptxas_report(compiled.asm["ptx"], arch)
    return {"shape": shape.name, "bank": bank, "dtype": str(dtype).removeprefix("torch."), "where": where, **report}


def main(argv: list[str] | None = None) -> int:
    import triton

    args = parse_args(argv)
    os.environ[dispatch.FP32_DOTS_ENV] = args.float32_dots
    rows = [
        compile_row(shape, bank, dtype, where, args.arch)
        for shape, bank, dtype, where in itertools.product(
            SHAPES, BANKS, (torch.bfloat16, torch.float32), ("registers", "memory")
        )
    ]
    result = {
        "script": "routing_registers.py", "argv": argv if argv is not None else sys.argv[1:], "arch": f"sm_{args.arch}",
        "triton": triton.__version__, "float32_dots": args.float32_dots, "rows": rows,
    }  # fmt: skip
    table = [f"routing kernel for sm_{args.arch}, Triton {triton.__version__}, float32 dots {args.float32_dots}"]
    table.append(f"{'shape':30} {'bank':8} {'dtype':9} {'bank in':10} {'registers':>9} {'spill stores B':>14}")
    for row in rows:
        table.append(
            f"{row['shape'][:30]:30} {row['bank']:8} {row['dtype']:9} {row['where']:10} {row['registers']:9d} "
            f"{row['spill_store_bytes']:14d}"
        )
    write_result(result, args.out / "routing_registers.json", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
