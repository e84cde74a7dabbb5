"""What int8 state storage costs: perplexity after a saved and reloaded state, and the two demo documents' answers.

    python benchmarks/int8_state.py [--prefix 2048] [--continuation 2048] [--texts wikipedia bible] [--out DIR]

``save_state(..., int8=True)`` (``BoundedCache.save(..., int8=True)``) stores keys and values as int8 with one float32
scale per slot: a smaller file, and an approximate state. For SmolLM2 with the shipped weights on the CPU (float32):

* perplexity: each text's first ``--prefix`` tokens are read into a ``BoundedCache``, which is saved twice (float32,
  int8) and loaded back; the next ``--continuation`` tokens are then scored from the cache as it was in memory, from
  the float32 file and from the int8 file (the first two must agree bit for bit);
* answers: each demo document is ingested by a neural database, its state re-saved as int8 and imported into a
  second database; both answer the document's questions, scored as the demo scores them.

Prints a table and writes ``DIR/int8_state.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import write_result
from tqdm import tqdm

from coda_gqa_l.data.facts import value_holds
from coda_gqa_l.evaluation.perplexity import perplexity_texts, stream_nll
from coda_gqa_l.models import BoundedCache
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.pretrained import load_coda_smollm2
from coda_gqa_l.neuraldb import NeuralDatabase
from coda_gqa_l.neuraldb.demo import SAMPLES, sample_text
from coda_gqa_l.statefile import load_state, module_fingerprint, read_state_metadata, save_state

REPO = Path(__file__).resolve().parents[1]


def perplexity_rows(model: Any, tokenizer: Any, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    fingerprint = module_fingerprint(model)
    rows = []
    texts = perplexity_texts(args.texts, args.prefix + args.continuation, tokenizer)
    for name, ids in tqdm(texts.items(), desc="perplexity", unit="text"):
        prefix, rest = ids[:, : args.prefix], ids[:, args.prefix - 1 :]  # the prefix's last token predicts the first
        cache = BoundedCache(model, block_size=1024)
        with torch.inference_mode():
            for start in range(0, prefix.shape[1] - 1, 1024):
                model(prefix[:, start : min(start + 1024, prefix.shape[1] - 1)], **cache_kwargs(cache), use_cache=True)
        files = {kind: folder / f"{name}_{kind}.safetensors" for kind in ("float32", "int8")}
        for kind, path in files.items():
            cache.save(path, model_fingerprint=fingerprint, int8=kind == "int8")
        nll = {"memory": _nll(model, rest, cache.fork())}
        for kind, path in files.items():
            nll[kind] = _nll(model, rest, BoundedCache.load(path, model, model_fingerprint=fingerprint))
        rows.append(
            {
                "text": name,
                "prefix": args.prefix,
                "continuation": args.continuation,
                "perplexity": {kind: math.exp(value.mean().item()) for kind, value in nll.items()},
                "float32_file_equals_memory": bool(torch.equal(nll["float32"], nll["memory"])),
                "max_token_nll_change_int8": float((nll["int8"] - nll["float32"]).abs().max()),
                "file_bytes": {kind: path.stat().st_size for kind, path in files.items()},
            }
        )
    return rows


def _nll(model: Any, rest: torch.Tensor, cache: BoundedCache) -> torch.Tensor:
    with torch.inference_mode():
        return stream_nll(model, rest, cache, chunk=1024)


def answer_rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for sample, (filename, label, questions) in tqdm(SAMPLES.items(), desc="demo documents", unit="document"):
        plain = NeuralDatabase(folder / f"{sample}_float32_store")
        info = plain.ingest(sample_text(filename), label=label)
        exported = plain.export(info.id, folder / f"{sample}_float32.safetensors")
        meta = read_state_metadata(exported)
        states = load_state(exported)
        int8_path = folder / f"{sample}_int8.safetensors"
        save_state(int8_path, states, model_fingerprint=meta["model_fingerprint"], int8=True, extra=meta["extra"])
        quantised = NeuralDatabase(
            folder / f"{sample}_int8_store", model=plain.model, tokenizer=plain.tokenizer, weights=plain.weights
        )
        imported = quantised.import_state(int8_path)
        values = tuple(expected for _, expected in questions)
        for question, expected in questions:
            answers = {
                "float32": plain.ask(info.id, question, max_new_tokens=40).strip(),
                "int8": quantised.ask(imported.id, question, max_new_tokens=40).strip(),
            }
            rows.append(
                {
                    "document": sample,
                    "question": question,
                    "expected": expected,
                    "answers": answers,
                    "holds": {kind: value_holds(text, expected, values) for kind, text in answers.items()},
                }
            )
        rows.append(
            {
                "document": sample,
                "file_bytes": {"float32": exported.stat().st_size, "int8": int8_path.stat().st_size},
            }
        )
    return rows


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| text | prefix + continuation | perplexity, state in memory | from the float32 file | from the int8 file | "
        "change | file MiB float32 / int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["perplexity"]:
        p, size = row["perplexity"], row["file_bytes"]
        lines.append(
            f"| {row['text']} | {row['prefix']:,} + {row['continuation']:,} | {p['memory']:.3f} | {p['float32']:.3f} | "
            f"{p['int8']:.3f} | {100 * (p['int8'] / p['float32'] - 1):+.2f}% | "
            f"{size['float32'] / 2**20:.2f} / {size['int8'] / 2**20:.2f} |"
        )
    lines += ["", "| document | answers holding the fact, float32 | int8 | answers that differ |", "|---|---|---|---|"]
    for sample in SAMPLES:
        asked = [r for r in result["answers"] if r["document"] == sample and "question" in r]
        held = {kind: sum(r["holds"][kind] for r in asked) for kind in ("float32", "int8")}
        differ = sum(r["answers"]["float32"] != r["answers"]["int8"] for r in asked)
        lines.append(f"| {sample} | {held['float32']} of {len(asked)} | {held['int8']} of {len(asked)} | {differ} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", type=int, default=2048, help="tokens read before the state is saved (default 2048)")
    p.add_argument("--continuation", type=int, default=2048, help="tokens scored after it (default 2048)")
    p.add_argument("--texts", nargs="+", default=["wikipedia", "bible"], choices=["wikipedia", "bible"],
                   help="perplexity texts (default both)")  # fmt: skip
    p.add_argument("--no-answers", action="store_true", help="leave out the demo documents' answers")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/int8_state", help="folder for the JSON")
    args = p.parse_args(argv)
    began = time.time()
    model, tokenizer = load_coda_smollm2(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result: dict[str, Any] = {
            "command": "python benchmarks/int8_state.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(began)),
            "device": "cpu, float32, torch " + torch.__version__,
            "perplexity": perplexity_rows(model, tokenizer, args, folder),
            "answers": [] if args.no_answers else answer_rows(folder),
        }
    write_result(result, args.out / "int8_state.json", table(result))


if __name__ == "__main__":
    main()
