"""Merge coda-eval results from several runs into one report: the tables and plots of coda-eval,
plus a passkey grid with one row per method and one column per (length, depth) cell.

    python benchmarks/merge_evals.py --out benchmarks/results/factorial/merged \
        benchmarks/results/factorial/gqa_bounded/eval.json \
        benchmarks/results/eval_smollm2_phase2b/eval.json:original,streaming,window

A source is ``eval.json``, ``eval.json:method,method`` (only those methods' rows) or
``eval.json:method,method:perplexity`` (or ``:passkey``: only that part of those rows). Every source
must come from the same device and dtype (figures are compared only within one); a cell measured
twice is refused, and so are bounded methods read with different bank-routing thresholds
(``coda-eval --routing``; the other methods have no banks). Perplexity rows that scored fewer
tokens than the largest set (a run given one length scores only its first window) are left out and
counted, so every figure is on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from coda_gqa_l.evaluation.report import write_report  # noqa: E402

PARTS = ("perplexity", "passkey")


def read_source(spec: str) -> tuple[Path, dict[str, Any], list[str] | None]:
    """The file, its results with only the selected methods' rows and part, and the methods named."""
    path_text, _, selection = spec.partition(":")
    methods, _, part = selection.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise SystemExit(f"merge_evals: no eval.json at {path}")
    if part and part not in PARTS:
        raise SystemExit(f"merge_evals: {spec}: the part after the methods is one of {PARTS}, not {part!r}")
    results = json.loads(path.read_text())
    chosen = methods.split(",") if methods else None
    for name in PARTS:
        results[name] = [r for r in results[name] if chosen is None or r["method"] in chosen]
        if part and name != part:
            results[name] = []
    return path, results, chosen


def merge(specs: list[str], command: str) -> dict[str, Any]:
    sources = [read_source(s) for s in specs]
    setting = {(r["meta"]["device"], r["meta"]["dtype"]) for _, r, _ in sources}
    if len(setting) != 1:
        raise SystemExit(f"merge_evals: the sources come from different devices or dtypes: {sorted(setting)}")
    # routing thresholds change only the methods with banks; those must all be read the same way
    with_banks = [
        r for _, r, _ in sources if any(row["method"].endswith("-bounded") for part in PARTS for row in r[part])
    ]
    routings = {tuple(r["meta"].get("routing", [])) for r in with_banks} or {()}
    if len(routings) != 1:
        raise SystemExit(f"merge_evals: the sources read the banks with different routing: {sorted(routings)}")
    # perplexity on the largest token set scored (the runs over every length); smaller ones are left out
    tokens = max((r["scored_tokens"] for _, res, _ in sources for r in res["perplexity"] if "ppl" in r), default=None)
    perplexity: dict[tuple, dict[str, Any]] = {}
    passkey: dict[tuple, dict[str, Any]] = {}
    left_out = 0
    for path, results, _ in sources:
        for row in results["perplexity"]:
            if "ppl" not in row:
                continue
            if row["scored_tokens"] != tokens:
                left_out += 1
                continue
            _add(perplexity, (row["method"], row.get("text", "wikipedia"), row["length"]), row, path)
        for row in results["passkey"]:
            if row.get("status") == "ok":
                _add(passkey, (row["method"], row["keys"], row["length"], row["depth"]), row, path)
    device, dtype = setting.pop()
    first = sources[0][1]["meta"]
    dates = sorted(r["meta"]["date"] for _, r, _ in sources)
    return {
        "meta": {
            "command": command,
            "date": dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}",
            "device": device,
            "dtype": dtype,
            "torch": first["torch"],
            "weights": "per source (see sources)",
            "gqa_weights": None,
            "config": first["config"],
            "num_sink": first["num_sink"],
            "routing": list(routings.pop()),
            "sources": [{"file": str(p), "methods": m or "all", "meta": r["meta"]} for p, r, m in sources],
            "perplexity_rows_left_out": left_out,
        },
        "perplexity": sorted(perplexity.values(), key=lambda r: (r["method"], r.get("text", ""), r["length"])),
        "passkey": sorted(passkey.values(), key=lambda r: (r["method"], r["keys"], r["length"], r["depth"])),
    }


def _add(table: dict[tuple, dict[str, Any]], key: tuple, row: dict[str, Any], path: Path) -> None:
    if key in table:
        raise SystemExit(f"merge_evals: {key} is measured twice (again in {path}); name the methods to take")
    table[key] = dict(row, source=str(path))


def passkey_grid(rows: list[dict[str, Any]]) -> str:
    """Methods down, (length, depth) across, each cell correct / trials (accuracy)."""
    cells = sorted({(r["length"], r["depth"]) for r in rows})
    header = "| method | keys | " + " | ".join(f"{n // 1024}K, depth {d:g}" for n, d in cells) + " |"
    lines = [header, "|---|---|" + "---|" * len(cells)]
    for method, keys in dict.fromkeys((r["method"], r["keys"]) for r in rows):
        by = {(r["length"], r["depth"]): r for r in rows if r["method"] == method and r["keys"] == keys}
        values = [f"{by[c]['correct']}/{by[c]['trials']} ({by[c]['accuracy']:.0%})" if c in by else "" for c in cells]
        lines.append(f"| {method} | {keys} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", help="eval.json or eval.json:method,method")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    command = "python benchmarks/merge_evals.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = merge(args.sources, command)
    written = write_report(results, args.out)
    grid = args.out / "passkey_grid.md"
    grid.write_text(passkey_grid(results["passkey"]))
    for path in [*written, grid]:
        print(path)
    print(f"{results['meta']['perplexity_rows_left_out']} perplexity rows on other tokens left out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
