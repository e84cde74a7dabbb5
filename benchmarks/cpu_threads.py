"""How many CPU threads the bounded model should use: ingest and answer speed on this machine's CPU
with 1 thread and with every core, alone and beside a busy neighbour process, against the original
model (full cache) measured in the same child process.

    PYTHONPATH=src python benchmarks/cpu_threads.py [--tokens 2048] [--answer-tokens 32] [--repeats 3] [--out DIR]

Each cell is a fresh child process (torch.set_num_threads before any work; OMP_NUM_THREADS set to
match) that loads SmolLM2 with the shipped weights, reads ``--tokens`` tokens of the demo's sample
document (repeated to that length) in 1,024-token chunks through ``BoundedCache`` (ingest tokens/s; the head's
logits for the last position only, as ``generate()`` prefills), then
greedily decodes ``--answer-tokens`` tokens (answer tokens/s); then the same with the original model and a
``DynamicCache``; ``--repeats`` such pairs, interleaved, give each figure as a median (the ratios are
ratios of medians; a shared machine's slow spells otherwise fall on one model). The neighbour is
another process doing single-threaded matrix products, as a test run or a second service would. A
cell that takes longer than ``--timeout`` seconds is reported as such. A table is printed last;
``DIR/cpu_threads.json`` has every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, time, torch
threads, tokens, answer_tokens, repeats = (int(a) for a in sys.argv[1:5])
models = sys.argv[5].split(",")
torch.set_num_threads(threads)
from transformers import DynamicCache
from coda_gqa_l.models.cache import BoundedCache
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.loader import load_smollm2
from coda_gqa_l.neuraldb.demo import SAMPLE, sample_text
from coda_gqa_l.models.pretrained import load_coda_smollm2

def run(model, cache):
    text = tok.encode(sample_text(SAMPLE), add_special_tokens=False)
    ids = torch.tensor([(text * (tokens // len(text) + 1))[:tokens]])  # the sample, repeated to the length
    with torch.inference_mode():
        began = time.perf_counter()
        for start in range(0, tokens, 1024):
            # last position's logits only, as generate() prefills (the neural database runs no head at all): a
            # 1,024 x vocabulary head product per chunk would be a large shared cost pulling both rates together
            out = model(ids[:, start : start + 1024], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        ingest = time.perf_counter() - began
        token = out.logits[:, -1:].argmax(-1)
        began = time.perf_counter()
        for _ in range(answer_tokens):
            token = model(token, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
        answer = time.perf_counter() - began
    return {"ingest_tokens_per_s": tokens / ingest, "answer_tokens_per_s": answer_tokens / answer}

bounded, tok = load_coda_smollm2(progress=False)
original, _ = load_smollm2(progress=False)
original.eval()
merged_only = None
if "bounded-merged" in models:  # adapters merged, products not fused: the model before the inference fold
    from coda_gqa_l.models.lora import merge_lora
    merged_only, _ = load_coda_smollm2(progress=False, merge_adapters=False)
    merge_lora(merged_only)
runs = {name: [] for name in models}
for _ in range(repeats):  # interleaved, so that a slow spell of the machine falls on both
    if "bounded" in runs:
        runs["bounded"].append(run(bounded, BoundedCache(bounded, block_size=1024)))
    if "bounded-merged" in runs:
        runs["bounded-merged"].append(run(merged_only, BoundedCache(merged_only, block_size=1024)))
    if "original" in runs:
        runs["original"].append(run(original, DynamicCache()))
result = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
result["runs"] = runs
result["threads_used"] = torch.get_num_threads()
print(json.dumps(result))
"""

NEIGHBOUR = "import torch\ntorch.set_num_threads(1)\na = torch.randn(768, 768)\nwhile True:\n    a = (a @ a).tanh()\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens ingested per cell (default 2048)")
    p.add_argument("--answer-tokens", type=int, default=32, help="tokens decoded per cell (default 32)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and every core)")
    models_help = (
        "models per cell: the bounded one alone for contexts the original cannot read in time; bounded-merged: "
        "adapters merged, products not fused (the inference fold's baseline)"
    )
    p.add_argument("--models", nargs="+", default=["bounded", "original"],
                   help=models_help + " (default bounded original)",
                   choices=["bounded", "original", "bounded-merged"])  # fmt: skip
    repeats_help = "interleaved runs of each model per cell, reported as medians (default 1)"
    p.add_argument("--repeats", type=int, default=1, help=repeats_help)
    p.add_argument("--neighbours", nargs="+", default=["idle", "busy"], choices=["idle", "busy"],
                   help="run the cells alone, beside a busy process, or both (default both)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=600, help="seconds before a cell is given up (default 600)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cpu_threads", help="folder for the JSON")
    return p.parse_args(argv)


def cell(threads: int, busy: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    env.pop("CODA_GQA_L_THREADS", None)  # the child sets its threads itself
    neighbour = (
        subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=dict(env, OMP_NUM_THREADS="1")) if busy else None
    )
    row: dict[str, Any] = {"threads": threads, "neighbour": "busy" if busy else "idle"}
    began = time.perf_counter()
    try:
        sizes = (threads, args.tokens, args.answer_tokens, args.repeats)
        child = [sys.executable, "-c", CHILD, *map(str, sizes), ",".join(args.models)]
        done = subprocess.run(child, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            row["error"] = done.stderr[-2000:]
        else:
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        row["error"] = f"took longer than {args.timeout:.0f} s"
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    row["wall_s"] = time.perf_counter() - began
    return row


def _rate(result: dict[str, float] | None, key: str, fmt: str) -> str:
    return "-" if result is None else format(result[key], fmt)


def _ratio(bounded: dict[str, float] | None, original: dict[str, float] | None, key: str) -> str:
    return "-" if bounded is None or original is None else f"{bounded[key] / original[key]:.2f}"


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| threads | neighbour | bounded ingest tok/s | original prefill tok/s | ratio | bounded answer tok/s "
             "| original answer tok/s | ratio | wall s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['threads']} | {r['neighbour']} | {r['error'][-80:]!r} | | | | | | {r['wall_s']:.0f} |")
            continue
        b, o = r.get("bounded"), r.get("original")
        lines.append(
            f"| {r['threads']} | {r['neighbour']} | {_rate(b, 'ingest_tokens_per_s', ',.0f')} "
            f"| {_rate(o, 'ingest_tokens_per_s', ',.0f')} | {_ratio(b, o, 'ingest_tokens_per_s')} "
            f"| {_rate(b, 'answer_tokens_per_s', '.1f')} | {_rate(o, 'answer_tokens_per_s', '.1f')} "
            f"| {_ratio(b, o, 'answer_tokens_per_s')} | {r['wall_s']:.0f} |"
        )
    if any("bounded-merged" in r for r in rows):
        lines += ["", "| threads | neighbour | merged-only ingest tok/s | folded / merged-only ingest "
                  "| merged-only answer tok/s | folded / merged-only answer |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            b, m = r.get("bounded"), r.get("bounded-merged")
            lines.append(
                f"| {r['threads']} | {r['neighbour']} | {_rate(m, 'ingest_tokens_per_s', ',.0f')} "
                f"| {_ratio(b, m, 'ingest_tokens_per_s')} | {_rate(m, 'answer_tokens_per_s', '.1f')} "
                f"| {_ratio(b, m, 'answer_tokens_per_s')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    thread_counts = args.threads or sorted({1, cores})
    rows = []
    for busy in [n == "busy" for n in args.neighbours]:
        for threads in thread_counts:
            rows.append(cell(threads, busy, args))
            print(render(rows[-1:]).splitlines()[2], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/cpu_threads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": platform.processor() or platform.machine(), "cores": cores, "tokens": args.tokens,
            "answer_tokens": args.answer_tokens, "repeats": args.repeats, "models": args.models}  # fmt: skip
    (args.out / "cpu_threads.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n" + render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
