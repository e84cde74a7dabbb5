"""Markdown tables and PNG plots from the JSON that ``run_suite.py`` writes.

    python benchmarks/render_tables.py benchmarks/results/suite.json [--splice benchmarks/results/speed.md] [--no-plots]

Writes ``<name>.md`` next to the JSON and prints it; ``--splice FILE`` also puts the tables into
FILE between the lines ``<!-- run_suite:begin -->`` and ``<!-- run_suite:end -->`` (appended
with those markers if FILE has none). Plots (matplotlib, log scales), next to the JSON:
``<name>_prefill.png`` (tokens/s against length, one line per method, one panel per shape) and
``<name>_decode.png`` (tokens/s against context).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]

BEGIN, END = "<!-- run_suite:begin -->", "<!-- run_suite:end -->"
# baselines dotted, ours solid, the public package dashed
LINE_STYLES: list[tuple[str, dict[str, Any]]] = [
    ("gqa-", {"linestyle": ":", "marker": "s"}),
    ("bounded-", {"linestyle": "-", "marker": "o"}),
    ("public-", {"linestyle": "--", "marker": "^"}),
    ("", {"linestyle": "-.", "marker": "x"}),
]


def si(value: float | None, unit: str = "") -> str:
    """``6.2M``, ``13.9K``, ``412``: three significant digits."""
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def cell(row: Row | None, key: str, fmt: Any = si) -> str:
    if row is None:
        return ""
    if row.get("status") == "ok":
        return str(fmt(row.get(key)))
    return "error" if row.get("status") == "error" else "skipped"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _rows(results: dict[str, Any], section: str, **where: Any) -> list[Row]:
    return [r for r in results["rows"] if r.get("section") == section and all(r.get(k) == v for k, v in where.items())]


def _ordered(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _grid(results: dict[str, Any], section: str, size_key: str, value_key: str, fmt: Any = si) -> str:
    """Per shape: one line per method, one column per size."""
    parts = []
    for shape in _ordered([r["shape"] for r in _rows(results, section) if "shape" in r]):
        rows = _rows(results, section, shape=shape)
        sizes = sorted({r[size_key] for r in rows})
        lines = []
        for method in _ordered([r["method"] for r in rows]):
            by_size = {r[size_key]: r for r in rows if r["method"] == method}
            lines.append([method] + [cell(by_size.get(s), value_key, fmt) for s in sizes])
        parts.append(f"**{shape}**\n\n" + table(["method"] + [f"{size_key} {s:,}" for s in sizes], lines))
    return "\n\n".join(parts)


def _decode_memory(results: dict[str, Any]) -> str:
    lines = []
    for r in _rows(results, "decode"):
        if r.get("status") == "ok":
            lines.append(
                [
                    r["shape"],
                    r["method"],
                    f"{r['context']:,}",
                    mib(r.get("state_bytes")),
                    mib(r.get("full_cache_bytes")),
                ]
                + [mib(r.get("peak_bytes")), r.get("how", "")]
            )
    header = ["shape", "method", "context", "state MiB", "full cache MiB", "peak MiB", "how"]
    return table(header, lines)


def _kernel(results: dict[str, Any]) -> str:
    lines = []
    rows = _rows(results, "kernel")
    for key in _ordered([(r["head_dim"], r["length"], r["impl"]) for r in rows]):
        pair = {r["direction"]: r for r in rows if (r["head_dim"], r["length"], r["impl"]) == key}
        error = pair.get("fwd", {}).get("rel_err_vs_float32")
        lines.append(
            [str(key[0]), f"{key[1]:,}", key[2], cell(pair.get("fwd"), "tflops"), cell(pair.get("fwd+bwd"), "tflops")]
            + ["-" if error is None else f"{error:.2e}"]
        )
    return table(["Dh", "L", "impl", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "rel. error vs fp32"], lines)


def _train(results: dict[str, Any]) -> str:
    lines = [
        [
            r["shape"],
            r["method"],
            f"{r['length']:,}",
            cell(r, "median_ms", lambda v: f"{v:.3f}"),
            cell(r, "peak_bytes", mib),
        ]
        for r in _rows(results, "train")
    ]
    return table(["shape", "method", "L", "fwd+bwd ms", "peak MiB"], lines)


def _routing(results: dict[str, Any]) -> str:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        [r["shape"], r["method"], f"{r['length']:,}", share(r.get("sync_hook_share")), share(r.get("profiler_share"))]
        + [share(r.get("named_kernel_share"))]
        + [share(r.get(f"captured_{key}")) for key in ("named_kernel_share", "exposed_share", "marginal_share")]
        + [r.get("note", r.get("error", ""))]
        for r in _rows(results, "routing")
    ]
    captured = ["captured: kernel share", "captured: run alone", "captured: time it adds"]
    return table(
        ["shape", "method", "L", "sync-hook share", "profiler share", "named-kernel share", *captured, "note"], lines
    )


def targets_table(results: dict[str, Any]) -> str:
    lines = []
    for t in results.get("targets", []):
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        goal = "" if t["goal"] is None else f"{t['sense']} {t['goal']}"
        lines.append([t["name"], value, goal, t["status"], t["against"]])
    return table(["ratio", "value", "goal", "status", "against"], lines)


def problems(results: dict[str, Any]) -> str:
    """Every error and skip, with its message: crashes are results, not gaps."""
    lines = []
    for r in results["rows"]:
        if r.get("status") in ("error", "skipped"):
            where = " ".join(str(r[k]) for k in ("section", "shape", "method", "impl", "direction") if k in r)
            size = next((f"{r[k]:,}" for k in ("length", "context") if k in r), "")
            message = (r.get("error") or r.get("reason") or "").replace("|", "/").replace("\n", " ")[:300]
            lines.append([where, size, r["status"], message])
    return table(["where", "size", "status", "message"], lines) if lines else "none"


def header(results: dict[str, Any]) -> str:
    meta = results["meta"]
    return (
        f"Command: `{meta['command']}`  \nDate: {meta['date']}. Device: {meta['device']}; torch {meta['torch']}, "
        f"triton {meta.get('triton')}, {meta['dtype']}, batch 1. Kernels: {meta.get('kernels')}."
    )


def markdown_report(results: dict[str, Any], brief: bool = False) -> str:
    """Every table; ``brief`` leaves out the memory tables (the console's share of the report)."""
    parts = [
        (header(results), True),
        ("### Prefill tokens/s\n\n" + _grid(results, "prefill", "length", "tokens_per_s"), True),
        ("### Prefill peak memory (MiB)\n\n" + _grid(results, "prefill", "length", "peak_bytes", mib), False),
        ("### Decode tokens/s\n\n" + _grid(results, "decode", "context", "tokens_per_s"), True),
        ("### Decode state and memory\n\n" + _decode_memory(results), False),
        ("### Differential attention kernel (2H stacked query heads over Hkv, causal)\n\n" + _kernel(results), True),
        ("### Training step\n\n" + _train(results), True),
        ("### Bank routing share of bounded prefill\n\n" + _routing(results), True),
        ("### Errors and skips\n\n" + problems(results), True),
        ("### Targets\n\n" + targets_table(results), True),
    ]
    return "\n\n".join(text for text, in_brief in parts if in_brief or not brief) + "\n"


def splice(path: Path, text: str) -> None:
    """Replace what lies between the markers in ``path`` (or append it with the markers)."""
    current = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in current and END in current:
        before, rest = current.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        path.write_text(before + block + after)
    else:
        path.write_text(current.rstrip("\n") + "\n\n" + block + "\n")


def plot(results: dict[str, Any], section: str, size_key: str, target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = _ordered([r["shape"] for r in _rows(results, section) if "shape" in r]) or ["(none)"]
    figure, axes = plt.subplots(1, len(shapes), figsize=(8.5 * len(shapes), 4.8), squeeze=False)
    palette = plt.get_cmap("tab20")
    for axis, shape in zip(axes[0], shapes, strict=True):
        rows = [r for r in _rows(results, section, shape=shape) if r.get("status") == "ok"]
        for index, method in enumerate(_ordered([r["method"] for r in rows])):
            points = sorted((r[size_key], r["tokens_per_s"]) for r in rows if r["method"] == method)
            style = next(style for prefix, style in LINE_STYLES if method.startswith(prefix))
            axis.plot(*zip(*points, strict=True), label=method, color=palette(index % palette.N), **style)
        axis.set(xscale="log", yscale="log", xlabel=size_key, ylabel="tokens/s", title=f"{section}, {shape} layer")
        axis.grid(True, which="both", alpha=0.3)
        if rows:
            axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(f"{results['meta']['device']}, {results['meta']['dtype']}, batch 1", fontsize=9)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def render(json_path: Path, splice_into: Path | None = None, plots: bool = True) -> list[Path]:
    results = json.loads(json_path.read_text())
    text = markdown_report(results)
    written = [json_path.with_suffix(".md")]
    written[0].write_text(text)
    if splice_into is not None:
        splice(splice_into, text)
    if plots:
        stem = json_path.with_suffix("")
        written.append(plot(results, "prefill", "length", Path(f"{stem}_prefill.png")))
        written.append(plot(results, "decode", "context", Path(f"{stem}_decode.png")))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="the suite's JSON (run_suite.py --out)")
    parser.add_argument("--splice", type=Path, help="a markdown file to put the tables into, between markers")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    args = parser.parse_args()
    written = render(args.json, args.splice, plots=not args.no_plots)
    print(written[0].read_text())
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
