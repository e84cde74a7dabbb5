"""CPU report for the core layer: prefill time at 16K tokens, and the measured size of
invariants 1-3 (docs/semantics.md section 5) at the 512-wide seed shape with the medium config.

    python benchmarks/cpu_core_report.py [--tokens 16384] [--out benchmarks/results/cpu_core_report.json]

Prints a table and writes JSON. Inputs are token-like (a small vocabulary plus noise) so that
exact-bank hits, inserts, LRU overwrites and summary updates all happen; the routing margin
(smallest distance of any score from a decision boundary) is reported next to the
differences, since a margin under rounding size would let chunkings decide differently.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig, CoDAGQA


def token_like(length: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(256, dim, generator=gen)
    return table[torch.randint(0, 256, (1, length), generator=gen)] + 0.05 * torch.randn(1, length, dim, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--invariance-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cpu_core_report.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = BoundedCoDAAttention(512, 8, 2, config=BoundedConfig.preset("medium"), collect_metrics=True)
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": "D=512, H=8, Hkv=2, Dh=64, medium (W=256, Me=64, Ms=64, S=64), float32",
    }

    # prefill time (metrics off: that is the production setting)
    layer.collect_metrics = False
    x = torch.randn(1, args.tokens, 512)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            layer.prefill_chunked(x, layer.init_state(1), block_size=256)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    results["prefill"] = {
        "tokens": args.tokens,
        "seconds_median": median,
        "seconds_all": times,
        "tokens_per_s": args.tokens / median,
    }
    layer.collect_metrics = True

    # invariant 1: L <= W, bounded equals unbounded
    twin = CoDAGQA(512, 8, 2)
    twin.load_state_dict(layer.state_dict(), strict=False)
    xw = torch.randn(1, layer.config.window, 512)
    with torch.inference_mode():
        inv1 = (layer.prefill_chunked(xw, layer.init_state(1), block_size=64)[0] - twin(xw)).abs().max().item()

    # invariant 2: block sizes and step, with evictions; invariant 3: forward equals prefill
    n = args.invariance_tokens
    xt = token_like(n, 512, 1)
    with torch.inference_mode():
        reference, ref_state = layer.prefill_chunked(xt, layer.init_state(1), block_size=n)
        inv2 = {}
        for block in (1, 7, 64, 197):
            y, _ = layer.prefill_chunked(xt, layer.init_state(1), block_size=block)
            inv2[f"block {block}"] = (y - reference).abs().max().item()
        state = layer.init_state(1)
        steps = torch.cat([layer.step(xt[:, t : t + 1], state)[0] for t in range(n)], 1)
        inv2["step"] = (steps - reference).abs().max().item()
    y_forward = layer(xt.clone().requires_grad_(True))
    inv3 = (y_forward.detach() - reference).abs().max().item()
    y_forward.sum().backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in layer.parameters() if p.grad is not None)
    events = {
        k: ref_state.metrics[k]
        for k in ("evicted", "exact_hits", "exact_inserts", "exact_overwrites", "summary_updates")
    }
    results["invariants"] = {
        "inv1_bounded_vs_unbounded_max_abs": inv1,
        "inv2_chunking_max_abs": inv2,
        "inv3_forward_vs_prefill_max_abs": inv3,
        "inv3_gradients_finite": grads_finite,
        "tokens": n,
        "routing_events": events,
        "min_routing_margin": ref_state.metrics["min_margin"],
    }

    table = Table(title=f"Core layer on the CPU ({results['machine']}, torch {torch.__version__})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"prefill {args.tokens} tokens, block 256 (median of {args.repeats})", f"{median:.2f} s")
    table.add_row("prefill throughput", f"{args.tokens / median:,.0f} tokens/s")
    table.add_row("inv 1: L = W, bounded vs unbounded CoDA", f"{inv1:.2e}")
    for key, value in inv2.items():
        table.add_row(f"inv 2: {key} vs one block ({n} tokens)", f"{value:.2e}")
    table.add_row("inv 3: forward vs prefill", f"{inv3:.2e}")
    table.add_row("inv 3: gradients finite", str(grads_finite))
    table.add_row(
        "routing events (hits/inserts/overwrites/summary)", "/".join(f"{events[k]:.0f}" for k in list(events)[1:])
    )
    table.add_row("smallest routing margin", f"{ref_state.metrics['min_margin']:.2e}")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
