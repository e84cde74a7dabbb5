"""coda-eval's tables (markdown) and plots (perplexity vs context length; passkey heat maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}. Device: {meta['device']}, {meta['dtype']}, torch {meta['torch']}. "
        f"Weights: {meta['weights'] or 'none (cold swap)'}; "
        f"bounded config {meta['config']} with {meta['num_sink']} sinks.",
        "",
        "### Perplexity (held-out Wikipedia, read as a stream)",
        "",
    ]
    ppl = results["perplexity"]
    lengths = sorted({r["length"] for r in ppl})
    methods = list(dict.fromkeys(r["method"] for r in ppl))
    lines.append("| method | " + " | ".join(f"{n:,}" for n in lengths) + " | longest / shortest |")
    lines.append("|---" * (len(lengths) + 2) + "|")
    for method in methods:
        by = {r["length"]: r["ppl"] for r in ppl if r["method"] == method}
        flat = f"{by[max(lengths)] / by[min(lengths)]:.3f}" if min(lengths) in by and max(lengths) in by else "-"
        cells = " | ".join(f"{by[n]:.2f}" if n in by else "-" for n in lengths)
        lines.append(f"| {method} | {cells} | {flat} |")
    lines += ["", "### Passkey retrieval (essays; key at least two windows before the question)", ""]
    lines.append("| method | keys | length | depth | correct / trials | accuracy | 95% interval |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in results["passkey"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['keys']} | {r['length']:,} | {r['depth']} | {r['status']} | | |")
            continue
        low, high = r["ci95"]
        lines.append(
            f"| {r['method']} | {r['keys']} | {r['length']:,} | {r['depth']} | {r['correct']} / {r['trials']} "
            f"| {r['accuracy']:.0%} | {low:.0%}-{high:.0%} |"
        )
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    import json

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "eval.md"]
    written[0].write_text(json.dumps(results, indent=1))
    written[1].write_text(markdown(results))
    try:
        written += _plots(results, out)
    except ImportError:  # matplotlib is a dev extra; the tables matter more
        pass
    return written


def _plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in results["perplexity"]):
        points = sorted((r["length"], r["ppl"]) for r in results["perplexity"] if r["method"] == method)
        axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="perplexity", title="Perplexity vs context")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out / "perplexity.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    rows = [r for r in results["passkey"] if r.get("status") == "ok"]
    if rows:
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cells = sorted({(r["keys"], r["length"], r["depth"]) for r in rows})
        grid = [
            [
                next(
                    (r["accuracy"] for r in rows if r["method"] == m and (r["keys"], r["length"], r["depth"]) == c),
                    float("nan"),
                )
                for c in cells
            ]
            for m in methods
        ]  # noqa: E501
        figure, axis = plt.subplots(figsize=(1.2 * len(cells) + 3, 0.5 * len(methods) + 2))
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(cells)), [f"{k}key {n // 1024}K d{d}" for k, n, d in cells], rotation=45, ha="right")
        axis.set_yticks(range(len(methods)), methods)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                label = "-" if value != value else f"{value:.0%}"
                axis.text(j, i, label, ha="center", va="center", color="w", fontsize=8)
        figure.colorbar(image, label="accuracy")
        axis.set_title("Passkey accuracy (key >= 2 windows before the question)")
        figure.tight_layout()
        paths.append(out / "passkey.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths
