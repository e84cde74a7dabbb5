"""coda-eval's tables (markdown) and plots (perplexity vs context length; passkey heat maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}. Device: {meta['device']}, {meta['dtype']}, torch {meta['torch']}. "
        f"Weights: {meta['weights'] or 'none (cold swap)'}"
        + (f", GQA arm {meta['gqa_weights']}" if meta.get("gqa_weights") else "")
        + "; "
        f"bounded config {meta['config']} with {meta['num_sink']} sinks"
        + (f", routing {' '.join(meta['routing'])}." if meta.get("routing") else "."),
        "",
    ]
    for text in dict.fromkeys(r.get("text", "wikipedia") for r in results["perplexity"]):
        lines += _perplexity_table(text, [r for r in results["perplexity"] if r.get("text", "wikipedia") == text])
    lines += _fact_table(results.get("facts", []))
    if not results["passkey"]:
        return "\n".join(lines) + "\n"
    lines += ["", "### Passkey retrieval (essays; key at least two windows before the question)", ""]
    lines.append("| method | keys | length | depth | correct / trials | accuracy | 95% interval |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in results["passkey"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['keys']} | {r['length']:,} | {r['depth']} | {r['status']} | | |")
            continue
        lines.append(f"| {r['method']} | {r['keys']} | {r['length']:,} | {r['depth']} | {_scored(r, 'trials')} |")
    return "\n".join(lines) + "\n"


def _scored(row: dict[str, Any], total: str) -> str:
    """``correct / total | accuracy | 95% interval`` cells of a retrieval row."""
    low, high = row["ci95"]
    return f"{row['correct']} / {row[total]} | {row['accuracy']:.0%} | {low:.0%}-{high:.0%}"


def _fact_table(rows: list[dict[str, Any]]) -> list[str]:
    """Fact recall: one line per method, kind (or "N facts") and length, the control marked."""
    if not rows:
        return []
    lines = ["", "### Fact recall (evaluation-only patterns, values and haystacks; at least two windows back)", ""]
    lines.append("| method | kind | length | facts in document | correct / asked | accuracy | 95% interval |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        kind = f"{r['kind']} (no-fact control)" if r.get("control") else r["kind"]
        if "accuracy" not in r:
            lines.append(f"| {r['method']} | {kind} | {r['length']:,} | | {r.get('status', '')} | | |")
            continue
        facts = r["facts"] if not r.get("control") else 0
        lines.append(f"| {r['method']} | {kind} | {r['length']:,} | {facts} | {_scored(r, 'asked')} |")
    return lines + [""]


TEXT_TITLES = {
    "wikipedia": "held-out Wikipedia",
    "bible": "the King James Bible, one document",
    "tiny": "random words (tiny test model)",
}


def _perplexity_table(text: str, ppl: list[dict[str, Any]]) -> list[str]:
    longest = max(r["length"] for r in ppl)
    lines = [
        f"### Perplexity: {TEXT_TITLES.get(text, text)}",
        "",
        f"The same {longest:,} tokens at every length, cut into windows of that length and read as a stream.",
        "",
    ]
    lengths = sorted({r["length"] for r in ppl})
    methods = list(dict.fromkeys(r["method"] for r in ppl))
    lines.append("| method | " + " | ".join(f"{n:,}" for n in lengths) + " | longest / shortest |")
    lines.append("|---" * (len(lengths) + 2) + "|")
    for method in methods:
        by = {r["length"]: r["ppl"] for r in ppl if r["method"] == method and "ppl" in r}
        skipped = {r["length"] for r in ppl if r["method"] == method and "ppl" not in r}
        flat = f"{by[max(lengths)] / by[min(lengths)]:.3f}" if min(lengths) in by and max(lengths) in by else "-"
        cells = " | ".join(f"{by[n]:.2f}" if n in by else "skipped" if n in skipped else "-" for n in lengths)
        lines.append(f"| {method} | {cells} | {flat} |")
    return lines + [""]


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
    texts = list(dict.fromkeys(r.get("text", "wikipedia") for r in results["perplexity"]))
    if texts:  # a passkey-only report has no perplexity figure
        figure, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 4.5), squeeze=False)
        for axis, text in zip(axes[0], texts, strict=True):
            rows = [r for r in results["perplexity"] if r.get("text", "wikipedia") == text]
            for method in dict.fromkeys(r["method"] for r in rows):
                points = sorted((r["length"], r["ppl"]) for r in rows if r["method"] == method and "ppl" in r)
                if not points:
                    continue
                axis.plot(*zip(*points, strict=True), marker="o", label=method)
            axis.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="perplexity")
            axis.set_title(f"Perplexity vs context: {TEXT_TITLES.get(text, text)}", fontsize=10)
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:  # every length of every method skipped: an empty frame, no legend
                axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(out / "perplexity.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)

    rows = [r for r in results["passkey"] if r.get("status") == "ok"]
    if rows:
        paths.append(out / "passkey.png")
        _passkey_heatmaps(plt, rows, paths[-1])
    facts = [r for r in results.get("facts", []) if "accuracy" in r]
    if facts:
        paths.append(out / "facts.png")
        _fact_heatmaps(plt, facts, paths[-1])
    return paths


def _fact_heatmaps(plt: Any, rows: list[dict[str, Any]], path: Path) -> None:
    """One kind x method heat map per context length (controls as their own columns)."""
    lengths = sorted({r["length"] for r in rows})
    columns = list(dict.fromkeys(r["method"] + (" (control)" if r.get("control") else "") for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    size = (max(4.0, 1.1 * len(columns) + 2) * len(lengths), max(3.0, 0.4 * len(kinds) + 1.6))
    figure, axes = plt.subplots(1, len(lengths), figsize=size, squeeze=False, layout="constrained")
    image = None
    for axis, length in zip(axes[0], lengths, strict=True):
        cell = {(r["kind"], r["method"] + (" (control)" if r.get("control") else "")): r for r in rows
                if r["length"] == length}  # fmt: skip
        grid = [[cell[(k, c)]["accuracy"] if (k, c) in cell else float("nan") for c in columns] for k in kinds]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, k in enumerate(kinds):
            for j, c in enumerate(columns):
                r = cell.get((k, c))
                axis.text(j, i, "-" if r is None else f"{r['correct']}/{r['asked']}", ha="center", va="center",
                          color="w", fontsize=7)  # fmt: skip
        axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(kinds)), kinds, fontsize=8)
        axis.set_title(f"{length // 1024}K tokens" if length >= 1024 else f"{length} tokens", fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=axes, label="answers holding the fact", shrink=0.8)
    figure.suptitle("Fact recall, fact at least two windows before the question", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _passkey_heatmaps(plt: Any, rows: list[dict[str, Any]], path: Path) -> None:
    """One depth x length heat map per (method, keys): the usual needle-in-a-haystack picture."""
    panels = list(dict.fromkeys((r["method"], r["keys"]) for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    columns = min(len(panels), 3)
    lines = -(-len(panels) // columns)
    size = (max(3.2, 0.9 * len(lengths) + 1.8) * columns + 1, max(2.6, 0.45 * len(depths) + 1.6) * lines + 0.6)
    figure, axes = plt.subplots(lines, columns, figsize=size, squeeze=False, layout="constrained")
    image = None
    for index, (method, keys) in enumerate(panels):
        axis = axes[index // columns][index % columns]
        cell = {(r["depth"], r["length"]): r for r in rows if r["method"] == method and r["keys"] == keys}
        grid = [[cell[(d, n)]["accuracy"] if (d, n) in cell else float("nan") for n in lengths] for d in depths]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                r = cell.get((d, n))
                label = "-" if r is None else f"{r['correct']}/{r['trials']}"
                axis.text(j, i, label, ha="center", va="center", color="w", fontsize=7)
        axis.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        axis.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        axis.set(xlabel="context tokens", ylabel="needle depth")
        axis.set_title(f"{method}, {keys} key{'s' if keys > 1 else ''}", fontsize=9)
    for index in range(len(panels), lines * columns):
        axes[index // columns][index % columns].axis("off")
    if image is not None:
        figure.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
    figure.suptitle("Passkey accuracy, key at least two windows before the question", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
