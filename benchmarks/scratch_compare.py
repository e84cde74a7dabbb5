"""From-scratch comparison (issue 8): GQA vs CoDA vs bounded CoDA in one small Llama, trained in
this process one after another, at equal tokens (every seed) and at equal wall-clock (one seed).

Each variant first runs a few untimed updates so kernel compilation and autotuning do not eat its
budget; then the measured runs. Prints a table and writes OUT/scratch_compare.json,
OUT/scratch_compare.md and OUT/scratch_compare.png (validation bits per byte against tokens and
against training seconds). The step-time target compares CoDA's measured step-time ratio over
GQA with its FLOP-proportional ideal (``flops_per_token``: CoDA doubles the attention matmuls).

    python benchmarks/scratch_compare.py --token-budget 20000000 --time-budget 120 --seeds 0 1 2 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("gqa", "coda", "coda-bounded")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--token-budget", type=int, required=True, help="equal-tokens runs: tokens each")
    p.add_argument("--time-budget", type=float, default=None, help="equal-wall-clock runs (seed 0): seconds each")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed updates per variant before measuring")
    p.add_argument("--out", type=Path, default=Path("runs/scratch-compare"))
    p.add_argument("--resume", type=Path, default=None,
                   help="an earlier call's scratch_compare.json: its runs are kept and not run again")  # fmt: skip
    # everything else goes to coda-scratch unchanged (model shape, batch, lr, tokenizer...)
    return p.parse_known_args(argv)


def flops_per_token(summary: dict[str, Any], differential: bool) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of the summary's model: matmuls
    of the projections, MLP and LM head, plus causal attention (QK^T and PV over T/2 keys on
    average); a differential layer computes the attention matmuls for twice the query heads."""
    m = summary["model"]
    dh = m["width"] // m["heads"]
    projections = m["width"] * dh * (2 * m["heads"] + 2 * m["kv_heads"])
    mlp = 3 * m["width"] * m["ffn"]
    attention = 2 * m["heads"] * dh * m["seq_len"] * (2 if differential else 1)  # 2 matmuls x T/2 keys x 2 FLOPs
    per_layer = 2 * (projections + mlp) + attention
    return 3 * (m["depth"] * per_layer + 2 * m["width"] * m["vocab"])


def run(variant: str, seed: int, budget: dict[str, Any], passthrough: list[str], out: Path) -> dict[str, Any]:
    """One run: coda-scratch's options from the command line, then this variant, seed, budget and folder."""
    from coda_gqa_l.training.scratch import parse_args as scratch_options
    from coda_gqa_l.training.scratch_trainer import train

    config = dataclasses.replace(scratch_options(passthrough, check=False), attention=variant, seed=seed, out=out,
                                 **budget)  # fmt: skip
    command = " ".join(["coda-scratch", *passthrough, "--attention", variant, "--seed", str(seed), "--out", str(out)]
                       + [f"--{k.replace('_', '-')} {v}" for k, v in budget.items()])  # fmt: skip
    summary = train(config, command=command)
    assert summary is not None  # one process: rank 0
    return summary


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    for variant in args.variants:  # compile and autotune outside the budgets
        run(variant, 0, {"max_steps": args.warmup_steps}, passthrough, args.out / "warmup" / variant)
    runs: list[dict[str, Any]] = json.loads(args.resume.read_text())["runs"] if args.resume else []
    done = {(r["mode"], r["attention"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for variant in args.variants:
            if ("equal tokens", variant, seed) in done:
                continue
            summary = run(variant, seed, {"token_budget": args.token_budget}, passthrough,
                          args.out / f"tokens-{variant}-s{seed}")  # fmt: skip
            runs.append({"mode": "equal tokens", **summary})
            _write(args, runs, began)
    if args.time_budget is not None:
        for variant in args.variants:
            if ("equal wall-clock", variant, args.seeds[0]) in done:
                continue
            summary = run(variant, args.seeds[0], {"time_budget": args.time_budget}, passthrough,
                          args.out / f"time-{variant}")  # fmt: skip
            runs.append({"mode": "equal wall-clock", **summary})
            _write(args, runs, began)
    report = _write(args, runs, began)
    print(report)
    return 0


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, variant): mean, spread and count of validation bpb and median step times."""
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        gqa = [r["median_step_s"] for r in runs if r["attention"] == "gqa" and r["mode"] == mode]
        gqa_step = statistics.median(gqa) if gqa else float("nan")
        for variant in dict.fromkeys(r["attention"] for r in runs):
            group = [r for r in runs if r["mode"] == mode and r["attention"] == variant]
            if not group:
                continue
            bpb = [r["final"]["val_bpb"] for r in group]
            step = statistics.median(r["median_step_s"] for r in group)
            ideal = flops_per_token(group[0], variant != "gqa") / flops_per_token(group[0], False)
            rows.append({
                "mode": mode, "variant": variant, "runs": len(group), "seeds": [r["seed"] for r in group],
                "tokens": statistics.mean(r["tokens"] for r in group), "val_bpb_mean": statistics.mean(bpb),
                "val_bpb_min": min(bpb), "val_bpb_max": max(bpb),
                "val_bpb_std": statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
                "median_step_s": step, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in group),
                "step_ratio_vs_gqa": step / gqa_step, "flop_ideal_ratio": ideal,
                "vs_ideal": step / gqa_step / ideal,
            })  # fmt: skip
    return rows


def markdown(runs: list[dict[str, Any]], rows: list[dict[str, Any]], command: str) -> str:
    first = runs[0]
    m = first["model"]
    lines = [
        f"Command: `{command}`  ",
        f"Device: {first['device']}. Model: {m['depth']} layers, width {m['width']}, {m['heads']} heads / "
        f"{m['kv_heads']} KV heads, SwiGLU {m['ffn']}, sequence {m['seq_len']}, vocabulary {m['vocab']:,} "
        f"({m['parameters']['total'] / 1e6:.1f}M parameters, {m['parameters']['non_embedding'] / 1e6:.1f}M "
        f"without embeddings); global batch {first['global_batch']}.",
        "",
        "| mode | variant | runs | tokens | val bpb (mean) | spread (min-max) | median step | tokens/s "
        "| step / GQA | FLOP ideal | measured / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['runs']} | {r['tokens']:,.0f} | {r['val_bpb_mean']:.4f} "
            f"| {r['val_bpb_min']:.4f}-{r['val_bpb_max']:.4f} | {r['median_step_s'] * 1000:.1f} ms "
            f"| {r['tokens_per_s']:,.0f} | {r['step_ratio_vs_gqa']:.3f}x | {r['flop_ideal_ratio']:.3f}x "
            f"| {r['vs_ideal']:.3f} |"
        )
    cells = [(r, cell) for r in runs for cell in r.get("passkey", [])]
    if cells:
        lines += ["", "Passkey after training (key at least two bounded windows before the question):", "",
                  "| mode | variant | seed | length | depth | correct / trials | 95% interval |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r, c in cells:
            low, high = c["ci95"]
            lines.append(f"| {r['mode']} | {r['attention']} | {r['seed']} | {c['length']:,} | {c['depth']} "
                         f"| {c['correct']} / {c['trials']} | {low:.0%}-{high:.0%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _write(args: argparse.Namespace, runs: list[dict[str, Any]], began: float) -> str:
    command = "python benchmarks/scratch_compare.py " + " ".join(sys.argv[1:])
    rows = aggregate(runs) if runs else []
    (args.out / "scratch_compare.json").write_text(
        json.dumps(
            {"command": command, "elapsed_s": time.monotonic() - began, "aggregate": rows, "runs": runs}, indent=1
        )  # fmt: skip
    )
    report = markdown(runs, rows, command) if runs else ""
    (args.out / "scratch_compare.md").write_text(report)
    if runs:
        _plot(runs, args.out / "scratch_compare.png")
    return report


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for r in runs:
        points = r["evaluations"]
        if not points:
            continue
        axis, key = (by_tokens, "tokens") if r["mode"] == "equal tokens" else (by_time, "trained_s")
        label = f"{r['attention']} seed {r['seed']}" if r["mode"] == "equal tokens" else r["attention"]
        axis.plot([p[key] for p in points], [p["val_bpb"] for p in points], marker=".", label=label,
                  color=colours[r["attention"]], alpha=0.4 + 0.6 * (r["seed"] == runs[0]["seed"]))  # fmt: skip
    by_tokens.set(xlabel="training tokens", ylabel="validation bits per byte", title="Equal tokens")
    by_time.set(xlabel="training seconds", ylabel="validation bits per byte", title="Equal wall-clock (seed 0)")
    for axis in (by_tokens, by_time):
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
