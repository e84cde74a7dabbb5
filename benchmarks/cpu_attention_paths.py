"""The bounded attention's two CPU inference paths, side by side: ingest speed of SmolLM2 through ``BoundedCache``
with the banded path (``banded_attention.attend_banded``, the default for inference) and with the per-segment
reference (``segment_attention.attend_segments``), for the shipped file's bounded config and for coda-eval's
StreamingLLM baseline (4 sinks + 380 window slots in 4-token segments), in one process on one thread.

    PYTHONPATH=src python benchmarks/cpu_attention_paths.py [--tokens 4096] [--repeats 3] [--out DIR]

Each method reads ``--tokens`` tokens of the demo's sample document (repeated to that length) in 1,024-token
chunks, last position's logits only; the two paths alternate ``--repeats`` times (a slow spell of a shared machine
falls on both) and each figure is a median; the ratio is a ratio of medians. The last logits of the two paths are
compared too (they differ only by float rounding). A table is printed last; ``DIR/cpu_attention_paths.json`` has
every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import coda_gqa_l.attention as attention_module
from coda_gqa_l.evaluation.methods import plain_window
from coda_gqa_l.models import BoundedCache, convert
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.loader import load_smollm2
from coda_gqa_l.models.pretrained import load_coda_smollm2
from coda_gqa_l.neuraldb.demo import SAMPLE, sample_text

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens ingested per run (default 4096)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each path (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cpu_threads", help="folder for the JSON")
    return p.parse_args(argv)


def ingest(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds to read ``ids`` in 1,024-token chunks, and the last position's logits."""
    cache = BoundedCache(model, block_size=1024)
    with torch.inference_mode():
        began = time.perf_counter()
        for start in range(0, ids.shape[1], 1024):
            out = model(ids[:, start : start + 1024], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - began, out.logits[:, -1].float()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shipped, tokenizer = load_coda_smollm2(progress=False)
    streaming = convert(load_smollm2(progress=False)[0], plain_window(380, 4)).eval()
    text = tokenizer.encode(sample_text(SAMPLE), add_special_tokens=False)
    ids = torch.tensor([(text * (args.tokens // len(text) + 1))[: args.tokens]])
    banded = attention_module.inference_attention
    paths = {"banded": banded, "per-segment reference": lambda device: False}
    rows: list[dict[str, Any]] = []
    for name, model in (("shipped bounded config", shipped), ("StreamingLLM 4 + 380", streaming)):
        seconds: dict[str, list[float]] = {path: [] for path in paths}
        logits: dict[str, torch.Tensor] = {}
        ingest(model, ids[:, :1024])  # warm-up
        for _ in range(args.repeats):
            for path, choose in paths.items():
                attention_module.inference_attention = choose  # type: ignore[assignment]
                try:
                    elapsed, logits[path] = ingest(model, ids)
                finally:
                    attention_module.inference_attention = banded
                seconds[path].append(elapsed)
        medians = {path: statistics.median(s) for path, s in seconds.items()}
        rows.append(
            {
                "model": name,
                "seconds": seconds,
                "tokens_per_s": {path: args.tokens / m for path, m in medians.items()},
                "speedup": medians["per-segment reference"] / medians["banded"],
                "max_logit_difference": (logits["banded"] - logits["per-segment reference"]).abs().max().item(),
            }
        )
    meta = {
        "command": "python benchmarks/cpu_attention_paths.py " + " ".join(argv or []),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} thread(s), float32",
        "torch": torch.__version__,
        "tokens": args.tokens,
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_attention_paths.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"{meta['date']}, {meta['device']}, {args.tokens} tokens, median of {args.repeats}")
    print("| model | banded tok/s | per-segment reference tok/s | speed-up | max logit difference |")
    print("|---|---|---|---|---|")
    for r in rows:
        rates = r["tokens_per_s"]
        print(
            f"| {r['model']} | {rates['banded']:,.0f} | {rates['per-segment reference']:,.0f} | "
            f"{r['speedup']:.2f}x | {r['max_logit_difference']:.1e} |"
        )


if __name__ == "__main__":
    main()
