"""What each Triton binary of a layer's prefill asks of a GPU's multiprocessor, read without a GPU: registers a thread,
shared memory, local memory and stack (spills), and counts in its SASS of the instructions that set a serial chain's
pace (barriers, shuffles, shared-memory loads and stores, warp-group products, local loads and stores). For screening a
kernel change on the CPU before device time goes to timing it: a change that spills, or adds barriers to the routing
chain (whose segments were measured to cost about one barrier round trip per decision), is unlikely to be faster.

    PYTHONPATH=src python benchmarks/kernel_resources.py [--out DIR] [--arch 90] [--tokens 2048] [--chunk 1024] \
        [--settings default "keys in chains" "routing 4 warps+keys in chains"] [--kernels route] \
        [--banks both exact summary]
    PYTHONPATH=src python benchmarks/kernel_resources.py --quick    # a tiny layer: a smoke run (the test runs it)

The 7B-shaped bfloat16 layer with medium banks (the one ``captured_prefill.py`` times: 32 heads, 8 KV heads, head size
128, window 256, 64 + 64 slots) prefills ``--tokens`` tokens from no state in ``--chunk``-token chunks on the CPU, with
the package's Triton path switched on and every kernel launch recorded instead of run (``kernel_compiles.py``'s
recorder); each distinct binary is compiled for ``sm_{--arch}`` with the installed Triton, and its cubin read with the
wheel's ``cuobjdump``. Static counts, not a profile: an instruction in a loop counts once. ``--settings`` are the
switches that change which binaries a prefill launches (each a ``captured_prefill.py`` setting of the same name),
alone or joined by '+'.
The CPU's Triton (3.9) is not the device's (3.6): registers and spills can differ there. Prints a table last; writes
``DIR/kernel_resources.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":  # compiling needs Triton's real JIT, set before triton is imported
    sys.exit("kernel_resources.py compiles kernels: unset TRITON_INTERPRET")
os.environ["CODA_GQA_L_KERNELS"] = "triton"  # the GPU's path, on the CPU (nothing runs: launches are recorded)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_header, write_result  # noqa: E402
from kernel_compiles import Binary, empty_triton_cache, recorded_launches  # noqa: E402

from coda_gqa_l.attention import BoundedCoDAAttention  # noqa: E402
from coda_gqa_l.config import BoundedConfig  # noqa: E402
from coda_gqa_l.kernels import diff_attention, dispatch  # noqa: E402
from coda_gqa_l.kernels import routing as routing_kernel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BANKS = {"both": (True, True), "exact": (True, False), "summary": (False, True)}
SETTINGS = ("default", "keys in chains", "routing 4 warps", "stacking pass")
# SASS opcodes counted (the first word of the opcode: BAR.SYNC counts as BAR)
COUNTED = {
    "BAR": "barriers",
    "SHFL": "shuffles",
    "LDS": "shared loads",
    "STS": "shared stores",
    "HGMMA": "warp-group products",
    "HMMA": "warp products",
    "LDL": "local loads (spills or a stack)",
    "STL": "local stores",
}
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kernel_resources")
    p.add_argument("--arch", type=int, default=90, help="GPU architecture to compile for (90: H100/H200)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens prefilled from no state")
    p.add_argument("--chunk", type=int, default=1024, help="tokens a chunk (routing runs from the second segment on)")
    p.add_argument(
        "--settings",
        nargs="+",
        type=_setting,
        default=["default", "keys in chains"],
        help=f"each one of {', '.join(SETTINGS)}, or several joined by '+' ('routing 4 warps+keys in chains')",
    )
    p.add_argument("--kernels", nargs="*", default=[], help="report only kernels whose name holds one of these")
    p.add_argument(
        "--banks",
        nargs="+",
        choices=list(BANKS),
        default=["both"],
        help="which banks the layer has (exact or summary alone: that chain's program compiled without the other's)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny layer (a smoke run)")
    return p.parse_args(argv)


def _setting(text: str) -> str:
    """``--settings``: one of ``SETTINGS``, or several joined by '+'."""
    unknown = [part for part in text.split("+") if part not in SETTINGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown setting {unknown[0]!r}: choose from {', '.join(SETTINGS)}")
    return text


@contextmanager
def setting(text: str) -> Iterator[None]:
    """The switches ``text`` names set while inside (``captured_prefill.py``'s settings of the same names)."""
    names = set(text.split("+"))
    warps, rotate = routing_kernel._WARPS, diff_attention.ROTATE_IN_FORWARD
    followers = dispatch.routing_key_followers()
    if "routing 4 warps" in names:
        routing_kernel._WARPS = 4
    if "stacking pass" in names:
        diff_attention.ROTATE_IN_FORWARD = False
    try:
        with dispatch.key_followers(followers and "keys in chains" not in names):
            yield
    finally:
        routing_kernel._WARPS, diff_attention.ROTATE_IN_FORWARD = warps, rotate


def layer(quick: bool, banks: str = "both") -> BoundedCoDAAttention:
    """The 7B-shaped bfloat16 layer with medium banks (``captured_prefill.seven_b_layer``, on the CPU), or only one of
    them (``banks``); ``quick``: a tiny one."""
    torch.manual_seed(0)
    exact, summary = (6, 5) if quick else (64, 64)
    keep_exact, keep_summary = BANKS[banks]
    slots = dict(num_landmarks_exact=exact * keep_exact, num_landmarks_summary=summary * keep_summary)
    if quick:
        config = BoundedConfig(window=32, segment=8, **slots)
        return BoundedCoDAAttention(64, 4, 2, head_dim=16, config=config).to(torch.bfloat16).eval()
    config = BoundedConfig(window=256, **slots)
    return BoundedCoDAAttention(4096, 32, 8, head_dim=128, config=config).to(torch.bfloat16).eval()


def prefill_binaries(model: BoundedCoDAAttention, tokens: int, chunk: int, arch: int) -> list[Binary]:
    """The distinct binaries a prefill of ``tokens`` from no state launches, in first-launch order."""
    x = torch.randn(1, tokens, model.core.embed_dim, dtype=torch.bfloat16)
    with torch.inference_mode(), recorded_launches(arch) as set_phase:
        set_phase("prefill")
        model.prefill_chunked(x, model.init_state(1), block_size=chunk, return_outputs=True)
        return list(set_phase("done").values())


def resources(binary: Binary, arch: int) -> dict[str, Any]:
    """``binary`` compiled for ``sm_{arch}``: registers, stack, shared and local bytes, and SASS counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(binary.source, target=GPUTarget("cuda", arch, 32), options=binary.options.__dict__)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True, check=True)
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True)
    found = _RESOURCES.search(usage.stdout)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {binary.name}:\n{usage.stdout}")
    registers, stack, _, local = (int(v) for v in found.groups())
    counts = dict.fromkeys(COUNTED, 0)
    instructions = 0
    for line in sass.stdout.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            instructions += 1
            op = match.group(1)
            if op in counts:
                counts[op] += 1
    return {
        "kernel": binary.name, "constexprs": binary.constexprs, "warps": binary.options.num_warps,
        "registers": registers, "stack_bytes": stack, "local_bytes": local,
        "shared_bytes": int(compiled.metadata.shared), "instructions": instructions, **counts,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.tokens, args.chunk = min(args.tokens, 96), min(args.chunk, 48)
    rows = []
    for banks, name in itertools.product(args.banks, args.settings):
        model = layer(args.quick, banks)
        with setting(name):
            binaries = prefill_binaries(model, args.tokens, args.chunk, args.arch)
        with empty_triton_cache():
            for binary in binaries:
                if args.kernels and not any(part in binary.name for part in args.kernels):
                    continue
                rows.append({"setting": name, "banks": banks, **resources(binary, args.arch)})
    import triton

    result = run_header("kernel_resources.py", argv if argv is not None else sys.argv[1:], torch.device("cpu"),
                        torch.bfloat16)  # fmt: skip
    shape = "tiny layer" if args.quick else "7B-shaped layer, medium banks"
    result.update(layer=shape, arch=f"sm_{args.arch}", triton=triton.__version__, tokens=args.tokens,
                  chunk=args.chunk, rows=rows)  # fmt: skip
    table = [f"kernel resources, {shape}, prefill of {args.tokens} tokens in chunks of {args.chunk}, sm_{args.arch}, "
             f"Triton {triton.__version__} (static counts: a loop's instruction counts once)"]  # fmt: skip
    table.append(
        f"{'setting':24} {'banks':7} {'kernel':30} {'warps':>5} {'regs':>4} {'shared B':>8} {'local B':>7} "
        f"{'stack B':>7} {'SASS':>6} " + " ".join(f"{op:>5}" for op in COUNTED)
    )
    for row in rows:
        table.append(
            f"{row['setting'][:24]:24} {row['banks']:7} {row['kernel'][:30]:30} {row['warps']:5d} "
            f"{row['registers']:4d} {row['shared_bytes']:8d} {row['local_bytes']:7d} {row['stack_bytes']:7d} "
            f"{row['instructions']:6d} " + " ".join(f"{row[op]:5d}" for op in COUNTED)
        )
    table.append("counted: " + ", ".join(f"{op} {what}" for op, what in COUNTED.items()))
    write_result(result, args.out / "kernel_resources.json", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
