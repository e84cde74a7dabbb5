"""Ingest time and peak memory of the neural database on the embedded default model.

    python benchmarks/ingest_memory.py [--tokens 10000 200000] [--out benchmarks/results/ingest_memory.json]

Each size runs in a fresh process: load SmolLM2-135M-Instruct converted to bounded CoDA, ingest a
document of about N tokens (the held-out and training Wikipedia text, repeated as needed), and
report wall time, tokens/s, peak resident memory (ru_maxrss) after loading and after ingesting,
and the state file size. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import json, resource, sys, time
from coda_gqa_l.data import load_wikipedia
from coda_gqa_l.neuraldb import NeuralDatabase
tokens = int(sys.argv[2])
db = NeuralDatabase(sys.argv[1])
text = "\\n\\n".join(d.text for d in load_wikipedia("all"))
ids = db.tokenizer.encode(text, add_special_tokens=False)
while len(ids) < tokens:
    ids = ids + ids
text = db.tokenizer.decode(ids[:tokens])
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
info = db.ingest(text, label=f"{tokens} tokens", progress=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"tokens": info.tokens, "seconds": seconds, "tokens_per_s": info.tokens / seconds,
                  "rss_after_load_mib": loaded / 1024, "rss_peak_mib": peak / 1024,
                  "state_bytes": info.state_bytes, "file_bytes": info.file_bytes,
                  "full_cache_bytes": info.full_cache_bytes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--out", default="benchmarks/results/ingest_memory.json")
    args = parser.parse_args()
    rows = []
    for tokens in args.tokens:
        with tempfile.TemporaryDirectory() as store:
            out = subprocess.run([sys.executable, "-c", _CHILD, store, str(tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    header = ("tokens", "seconds", "tok/s", "RSS load", "RSS peak", "state file", "full cache")
    print(" ".join(f"{h:>11}" for h in header))
    for r in rows:
        print(
            f"{r['tokens']:>11} {r['seconds']:>11.1f} {r['tokens_per_s']:>11.0f} {r['rss_after_load_mib']:>9.0f}Mi "
            f"{r['rss_peak_mib']:>9.0f}Mi {r['file_bytes'] / 2**20:>9.2f}Mi {r['full_cache_bytes'] / 2**20:>9.1f}Mi"
        )
    result = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
