"""Perplexity of SmolLM2-135M-Instruct before and after conversion, on held-out Wikipedia text.

    python benchmarks/retrofit_perplexity.py [--tokens 2048] [--dtype float32] [--out results/retrofit.json]

Rows: the original model (full cache), converted unbounded CoDA with the default lambda near 0
and with the exact-identity option, and the bounded presets read as a stream through their
fixed-size state, untrained (cold swap). Prints a table and writes JSON. Runs on the CPU or GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from coda_gqa_l import BoundedConfig
from coda_gqa_l.data import load_wikipedia
from coda_gqa_l.evaluation import stream_nll
from coda_gqa_l.models import BoundedCache, convert
from coda_gqa_l.models.loader import load_smollm2


def heldout_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the held-out articles, joined in title order."""
    text = "\n\n".join(doc.text for doc in load_wikipedia("heldout"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"held-out text has only {ids.shape[1]} tokens, asked for {tokens}")
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/retrofit_perplexity.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_smollm2(dtype=dtype)
    model.to(device)
    ids = heldout_ids(tokenizer, args.tokens)

    def measure(name: str, m: torch.nn.Module, cache_factory) -> dict:
        start = time.perf_counter()
        nll = stream_nll(m, ids, cache_factory(m), chunk=args.chunk)
        return {"method": name, "ppl": math.exp(nll.mean().item()), "seconds": time.perf_counter() - start}

    rows = [measure("original, full cache", model, lambda m: DynamicCache(config=m.config))]
    rows.append(
        measure(
            "CoDA unbounded, lambda ~ 0", convert(copy.deepcopy(model), None), lambda m: DynamicCache(config=m.config)
        )
    )
    rows.append(
        measure(
            "CoDA unbounded, exact identity",
            convert(copy.deepcopy(model), None, exact_identity=True),
            lambda m: DynamicCache(config=m.config),
        )
    )
    bounded = {f"CoDA bounded {name}, untrained": BoundedConfig.preset(name) for name in ("tiny", "medium", "large")}
    bounded["CoDA bounded medium + 4 sinks (4+256+60+64), untrained"] = BoundedConfig.preset("medium", num_sink=4)
    bounded["window only, 384 slots (same storage as medium)"] = BoundedConfig(
        window=384, num_landmarks_exact=0, num_landmarks_summary=0
    )
    for name, cfg in bounded.items():
        rows.append(measure(name, convert(copy.deepcopy(model), cfg), BoundedCache))
    base = rows[0]["ppl"]
    for row in rows:
        row["vs_original"] = row["ppl"] / base - 1
    table = Table(title=f"SmolLM2-135M-Instruct, {args.tokens} held-out Wikipedia tokens, {args.dtype} on {device}")
    for col in ("method", "perplexity", "vs original", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['ppl']:.3f}", f"{100 * row['vs_original']:+.2f}%", f"{row['seconds']:.1f}")
    Console().print(table)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": args.dtype,
        "tokens": args.tokens,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
