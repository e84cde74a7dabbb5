"""How an untrained (cold-swapped) SmolLM2 should spend 384 slots: sinks, recent window, exact and
summary banks, and the segment length, against StreamingLLM at the same storage (issue 6).

Perplexity of the same held-out Wikipedia tokens (the first ``--tokens``), cut into windows of
each ``--lengths`` entry and read as a stream, exactly as ``coda-eval`` does. Prints a table and
writes OUT/cold_slot_split.json and .md.

    PYTHONPATH=src python benchmarks/cold_slot_split.py --out benchmarks/results/cold_slot_split
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from coda_gqa_l.config import BoundedConfig
from coda_gqa_l.evaluation.methods import plain_window
from coda_gqa_l.evaluation.perplexity import perplexity_rows, perplexity_texts
from coda_gqa_l.models.convert import convert
from coda_gqa_l.models.loader import load_model


def splits() -> dict[str, BoundedConfig]:
    """Every split has 384 slots of storage (sinks included)."""

    def coda(window: int, exact: int, summary: int, segment: int) -> BoundedConfig:
        return BoundedConfig(window=window, num_landmarks_exact=exact, num_landmarks_summary=summary,
                             num_sink=4, segment=segment)  # fmt: skip

    return {
        "StreamingLLM 4 + 380": plain_window(380, 4),
        "medium 4 + 256 + 60 + 64, S 64 (the preset)": coda(256, 60, 64, 64),
        "4 + 256 + 60 + 64, S 32": coda(256, 60, 64, 32),
        "4 + 256 + 124 exact, S 64": coda(256, 124, 0, 64),
        "4 + 320 + 28 + 32, S 64": coda(320, 28, 32, 64),
        "4 + 320 + 28 + 32, S 32": coda(320, 28, 32, 32),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 16384])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cold_slot_split"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model("smollm2")
    ids = perplexity_texts(["wikipedia"], args.tokens, tokenizer)["wikipedia"]
    rows = []
    for name, config in splits().items():
        assert config.storage_slots == 384, (name, config.storage_slots)
        model = convert(copy.deepcopy(base), config).eval()
        began = time.perf_counter()
        ppl = {r["length"]: r["ppl"] for r in perplexity_rows(model, True, ids, args.lengths, chunk=1024)}
        visible = f"{config.num_sink + config.window - config.segment + 1}-{config.num_sink + config.window}"
        rows.append({"split": name, "config": config.to_dict(), "storage_slots": config.storage_slots,
                     "visible_recent": visible, "ppl": ppl, "seconds": time.perf_counter() - began})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python benchmarks/cold_slot_split.py " + " ".join(sys.argv[1:]),
        "device": "cpu",
        "torch": torch.__version__,
        "dtype": "float32",
        "tokens": args.tokens,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cold_slot_split.json").write_text(json.dumps(result, indent=1))
    reference = rows[0]["ppl"]
    lines = ["| split (384 slots) | sinks + recent tokens visible | "
             + " | ".join(f"PPL {n:,} (vs StreamingLLM)" for n in args.lengths) + " |",
             "|---|---|" + "---|" * len(args.lengths)]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{r['ppl'][n]:.3f} ({100 * (r['ppl'][n] / reference[n] - 1):+.2f}%)" for n in args.lengths)
        lines.append(f"| {r['split']} | {r['visible_recent']} | {cells} |")
    table = "\n".join(lines) + "\n"
    (args.out / "cold_slot_split.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
