"""The original model with a full cache on needle_trace's fact documents: its answers to value-first facts (a
statement that gives its value before saying what it is) beside subject-first ones, the same documents and scoring
as ``needle_trace.py --facts N``. Says whether a value-first fact can be answered from the whole text at all.

    PYTHONPATH=src python benchmarks/original_fact_answers.py --facts 5 --kinds colour place phrase --length 4096 \\
        --trials 10 --seed 2 [--out DIR]

SmolLM2-135M-Instruct in float32 on the CPU, the document read in one forward into a ``DynamicCache``, each
question answered greedily from a copy of it (``evaluation.fact_recall.generate_answers``, cut at the answer's
stop) and scored by ``data.facts.answer_holds``. Prints the counts and the value-first answers; writes
``DIR/original_fact_answers.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from needle_trace import _fact_cases  # noqa: E402  (the same documents)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=5, help="facts per document, all asked (default 5)")
    p.add_argument("--kinds", nargs="+", default=None, help="fact kinds to draw from (default: all ten)")
    p.add_argument("--length", type=int, default=4096, help="tokens per document (default 4096)")
    p.add_argument("--trials", type=int, default=10, help="documents (default 10)")
    p.add_argument("--seed", type=int, default=2, help="document draws (default 2)")
    p.add_argument("--out", type=Path, default=None, help="folder for original_fact_answers.json")
    args = p.parse_args(argv)
    args.sample = None
    from transformers import DynamicCache

    from coda_gqa_l.data.facts import Fact, answer_holds
    from coda_gqa_l.data.prompts import PromptFormat
    from coda_gqa_l.evaluation.fact_recall import generate_answers
    from coda_gqa_l.models.hf_compat import cache_kwargs
    from coda_gqa_l.models.loader import load_smollm2

    model, tokenizer = load_smollm2(progress=False)
    layout = PromptFormat.for_tokenizer(tokenizer)
    rows = []
    for trial, case in enumerate(_fact_cases(args, tokenizer, 512)):
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=case.ids[None], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            for i, (value, question) in enumerate(zip(case.values, case.questions, strict=True)):
                prompt = tokenizer.encode(layout.question.format(question=question), add_special_tokens=False)
                answer = generate_answers(model, copy.deepcopy(cache), torch.tensor([prompt]), tokenizer, layout)[0]
                asked = next(f for f in case.others if isinstance(f, Fact) and f.value == value)
                rows.append({"trial": trial, "value": value, "kind": case.kinds[i], "value_first": bool(case.after[i]),
                             "question": question, "answer": answer,
                             "correct": answer_holds(answer, asked, case.others)})  # fmt: skip
    first = [r for r in rows if r["value_first"]]
    other = [r for r in rows if not r["value_first"]]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) for k, v in vars(args).items()}
        (args.out / "original_fact_answers.json").write_text(json.dumps({"args": settings, "rows": rows}, indent=1))
    for r in first:
        print(f"  {r['kind']:8s} {r['value']!r} -> {r['answer'][:48]!r} {'yes' if r['correct'] else 'no'}")
    print(f"original, full cache: value-first {sum(r['correct'] for r in first)} of {len(first)}, "
          f"subject-first {sum(r['correct'] for r in other)} of {len(other)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
