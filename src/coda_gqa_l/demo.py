"""``coda-demo``: stream a long random sequence through one bounded layer and show that its
state does not grow.

It builds a ``BoundedCoDAAttention`` from a preset (``tiny``, ``medium``, ``large``), feeds it
``--tokens`` random inputs (``torch.randn`` with a fixed seed, drawn block by block) through
``prefill_chunked`` under ``torch.inference_mode()``, then prints a table: tokens seen, the
state's bytes before and after (equal), the bytes of the full float32 KV cache it replaces,
their ratio, throughput, and the routing counts from ``state.metrics``.

Usage::

    coda-demo                          # 16384 tokens, preset medium, CPU
    python -m coda_gqa_l.demo --tokens 4096 --config tiny --json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from .attention import BoundedCoDAAttention
from .cli_help import HelpFormatter, first_paragraph
from .config import PRESETS, BoundedConfig
from .cpu_threads import set_cpu_threads
from .version import __version__

# state.metrics keys shown in the table, in this order (absent ones are skipped)
ROUTING_KEYS: tuple[str, ...] = (
    "evicted",
    "gated_out",
    "exact_candidates",
    "exact_hits",
    "exact_novel",
    "exact_inserts",
    "exact_overwrites",
    "summary_candidates",
    "summary_seeds",
    "summary_updates",
    "exact_fill",
    "summary_fill",
    "min_margin",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coda-demo", description=first_paragraph(__doc__), formatter_class=HelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to stream (default 16384)")
    parser.add_argument("--config", choices=sorted(PRESETS), default="medium", help="BoundedConfig preset")
    parser.add_argument("--embed-dim", type=int, default=512, help="model width D")
    parser.add_argument("--heads", type=int, default=8, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads Hkv")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per prefill_chunked call")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the inputs")
    parser.add_argument("--json", action="store_true", help="also print one JSON line at the end")
    threads_help = "CPU threads (default $CODA_GQA_L_THREADS, else the cores not already busy)"
    parser.add_argument("--threads", type=int, default=None, help=threads_help)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("tokens", "embed_dim", "heads", "kv_heads", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Stream the tokens and return every figure the table shows."""
    torch.manual_seed(args.seed)
    cfg = BoundedConfig.preset(args.config)
    layer = BoundedCoDAAttention(args.embed_dim, args.heads, args.kv_heads, config=cfg, collect_metrics=True)
    layer.eval()
    dtype = torch.float32
    bytes_start = layer.cache_bytes(1, dtype)
    state = layer.init_state(1, device="cpu", dtype=dtype)
    gen = torch.Generator().manual_seed(args.seed)
    finite = True

    with torch.inference_mode(), tqdm(total=args.tokens, unit="tok", desc=f"prefill ({args.config})") as bar:
        t0 = time.perf_counter()
        for start in range(0, args.tokens, args.block_size):
            n = min(args.block_size, args.tokens - start)
            x = torch.randn(1, n, args.embed_dim, generator=gen, dtype=dtype)
            y, state = layer.prefill_chunked(x, state, block_size=args.block_size)
            finite = finite and bool(torch.isfinite(y).all())
            bar.update(n)
        seconds = time.perf_counter() - t0

    bytes_end = layer.cache_bytes(1, dtype)
    state_bytes = state.nbytes()
    if state_bytes != bytes_end:
        raise RuntimeError(f"state.nbytes() = {state_bytes} but layer.cache_bytes(1, float32) = {bytes_end}")
    full_kv = layer.full_cache_bytes(state.pos, dtype=dtype)  # keys plus values of every token seen
    return {
        "version": __version__,
        "config": args.config,
        "window": cfg.window,
        "exact_slots": cfg.num_landmarks_exact,
        "summary_slots": cfg.num_landmarks_summary,
        "embed_dim": args.embed_dim,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": layer.head_dim,
        "block_size": args.block_size,
        "tokens": state.pos,
        "state_bytes": state_bytes,
        "cache_bytes_start": bytes_start,
        "cache_bytes_end": bytes_end,
        "full_kv_bytes": full_kv,
        "ratio": full_kv / state_bytes,
        "seconds": seconds,
        "tokens_per_s": state.pos / seconds if seconds > 0 else math.inf,
        "outputs_finite": finite,
        "threads": torch.get_num_threads(),
        "routing": {key: state.metrics[key] for key in ROUTING_KEYS if key in state.metrics},
    }


def _mib(n: int) -> str:
    return f"{n:,} B ({n / 2**20:.2f} MiB)"


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"coda-gqa-l {result['version']}: one bounded layer, float32, batch 1",
        caption=(
            f"preset {result['config']}: W={result['window']}, exact={result['exact_slots']}, "
            f"summary={result['summary_slots']}; D={result['embed_dim']}, H={result['heads']}, "
            f"Hkv={result['kv_heads']}, Dh={result['head_dim']}. Routing counts are summed over "
            "batch rows and KV heads."
        ),
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("tokens seen (state.pos)", f"{result['tokens']:,}")
    table.add_row("cache_bytes at start", _mib(result["cache_bytes_start"]))
    table.add_row("cache_bytes at end", _mib(result["cache_bytes_end"]))
    table.add_row("state.nbytes() at end", _mib(result["state_bytes"]))
    table.add_row("full KV cache it replaces (K+V)", _mib(result["full_kv_bytes"]))
    table.add_row("full KV / state", f"{result['ratio']:.1f}x")
    table.add_row(
        "throughput",
        f"{result['tokens_per_s']:,.0f} tok/s ({result['seconds']:.2f} s, {result['threads']} threads)",
    )
    table.add_row("outputs finite", str(result["outputs_finite"]))
    for key, value in result["routing"].items():
        if key == "min_margin":
            shown = f"{value:.1e}"
        elif key.endswith("_fill"):
            shown = f"{value:.3f}"
        else:
            shown = f"{value:,.0f}"
        table.add_row(f"metrics[{key!r}]", shown)
    console.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    try:
        set_cpu_threads(args.threads)
    except ValueError as exc:
        raise SystemExit(f"coda-demo: {exc}") from None
    result = run(args)
    render(result, Console())
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
