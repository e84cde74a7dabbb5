"""Fact recall through the state: evaluation-only facts far before the question, answers generated.

Each trial is a fact document (``data/facts.py``, evaluation split: held-out patterns, values and
subjects, in held-out haystacks) read as a stream through the model's cache; then every asked
question is put to the state after the document (a document with several facts is read once per
question, which is what asking a stored state does), and the greedy answer is generated (at most
``ANSWER_TOKENS`` tokens, cut at its stop: the end-of-answer marker, the end of its first line,
or end of sequence). An answer counts when it contains the fact's normalised value and no other
fact's value (``facts.answer_holds``).

Prompts of one cell run as one batch: they are equalised by dropping a few haystack tokens right
after the prompt prefix (the questions differ in length by a few tokens).

    rows = fact_rows(model, bounded=True, tokenizer=tok, hay=heldout_ids, kinds=KINDS, lengths=[4096],
                     trials=40, min_distance=512, seed=1234)
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..data.facts import KINDS, FactDocument, FactSampler, answer_holds, make_fact_document
from ..data.passkey import wilson_interval
from ..data.prompts import PromptFormat
from ..models.cache import new_cache
from ..models.hf_compat import cache_kwargs
from .eval_config import EvalConfig

ANSWER_TOKENS = 24
DEPTHS = (0.1, 0.6)


def _prompt(doc: FactDocument, question: list[int]) -> torch.Tensor:
    """The document up to its first question, then ``question`` (the tokens of one asked question)."""
    return torch.cat([doc.ids[: doc.prompt_end], torch.tensor(question, dtype=doc.ids.dtype)])


def _equalised(prompts: list[torch.Tensor], prefix_len: int) -> torch.Tensor:
    """``prompts`` as one batch: each trimmed to the shortest by dropping haystack tokens right after
    the prompt prefix (a few tokens: the questions differ in length, the facts sit further in)."""
    shortest = min(len(p) for p in prompts)
    return torch.stack([torch.cat([p[:prefix_len], p[prefix_len + len(p) - shortest :]]) for p in prompts])


@torch.inference_mode()
def generate_answers(
    model: nn.Module,
    cache: Any,
    questions: torch.Tensor,
    tokenizer: Any,
    layout: PromptFormat,
    max_tokens: int = ANSWER_TOKENS,
) -> list[str]:
    """Greedy answers of a batch to ``questions`` (B, Lq) continuing ``cache``, each cut at its stop."""
    logits = model(input_ids=questions, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    produced: list[list[int]] = [[] for _ in range(questions.shape[0])]
    for _ in range(max_tokens):
        token = logits.argmax(-1)
        for row, t in zip(produced, token.tolist(), strict=True):
            row.append(int(t))
        if all(_stopped(tokenizer, row, layout) for row in produced):
            break
        logits = model(input_ids=token[:, None], **cache_kwargs(cache), use_cache=True).logits[:, -1]
    return [cut_answer(tokenizer.decode(row, skip_special_tokens=False), tokenizer, layout) for row in produced]


def _stopped(tokenizer: Any, row: list[int], layout: PromptFormat) -> bool:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in row:
        return True
    text = tokenizer.decode(row, skip_special_tokens=False)
    return any(stop in text for stop in layout.stop_strings) or "\n" in text.lstrip()


def cut_answer(text: str, tokenizer: Any, layout: PromptFormat) -> str:
    """An answer up to its stop: a stop string, the end-of-sequence token or the end of its first line."""
    eos = getattr(tokenizer, "eos_token", None)
    for stop in (*layout.stop_strings, *([eos] if eos else [])):
        text = text.split(stop, 1)[0]
    return text.lstrip().split("\n", 1)[0].strip()


def _documents(
    tokenizer: Any,
    layout: PromptFormat,
    hay: list[int],
    rng: random.Random,
    *,
    kinds: Sequence[str],
    length: int,
    trials: int,
    num_facts: int,
    min_distance: int,
    include_facts: bool,
) -> list[FactDocument]:
    sampler = FactSampler("eval")
    return [
        make_fact_document(
            tokenizer,
            layout,
            hay,
            rng,
            sampler=sampler,
            length=length,
            num_facts=num_facts,
            num_asked=num_facts,
            kinds=kinds,
            depth_range=DEPTHS,
            min_distance=min_distance,
            include_facts=include_facts,
        )  # fmt: skip
        for _ in range(trials)
    ]


def fact_rows(
    model: nn.Module,
    bounded: bool,
    tokenizer: Any,
    hay: list[int],
    *,
    kinds: Sequence[str] = KINDS,
    lengths: Sequence[int] = (4096, 16384),
    trials: int = 40,
    num_facts: int = 1,
    min_distance: int = 512,
    seed: int = 1234,
    batch: int = 10,
    chunk: int = 1024,
    include_facts: bool = True,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """One row per (kind, length): answers that hold the fact, of all asked, with a Wilson interval.

    ``num_facts > 1`` puts that many facts (kinds drawn from ``kinds``) in each document and asks
    them all; ``include_facts=False`` is the no-fact control (the same questions, no facts).
    """
    device = next(model.parameters()).device
    layout = PromptFormat.for_tokenizer(tokenizer)
    prefix_len = len(tokenizer.encode(layout.document_prefix, add_special_tokens=False))
    cells = [(k,) for k in kinds] if num_facts == 1 else [tuple(kinds)]
    rows: list[dict[str, Any]] = []
    what = "no-fact control" if not include_facts else ("facts" if num_facts == 1 else f"{num_facts} facts")
    progress = tqdm(total=len(lengths) * len(cells), desc=what, unit="cell")
    for length in lengths:
        for cell in cells:
            name = cell[0] if num_facts == 1 else f"{num_facts} facts"
            progress.set_postfix_str(f"{name}, {length:,} tokens")
            if deadline is not None and time.monotonic() > deadline:
                rows.append({"kind": name, "length": length, "status": "skipped (time budget)"})
                progress.update()
                continue
            rng = random.Random(f"{seed}/{name}/{length}/{include_facts}")
            docs = _documents(tokenizer, layout, hay, rng, kinds=cell, length=length, trials=trials,
                              num_facts=num_facts, min_distance=min_distance, include_facts=include_facts)  # fmt: skip
            # every asked question is its own prompt (document + question), as an ask from the stored state
            items = [(doc, fact) for doc in docs for fact in doc.asked]
            right, asked = 0, 0
            examples: list[dict[str, Any]] = []
            for start in range(0, len(items), batch):
                group = items[start : start + batch]
                questions = [layout.question.format(question=fact.question()) for _, fact in group]
                prompts = [_prompt(doc, tokenizer.encode(q, add_special_tokens=False)) for (doc, _), q in
                           zip(group, questions, strict=True)]  # fmt: skip
                ids = _equalised(prompts, prefix_len).to(device)
                cache = new_cache(model, bounded, chunk)
                with torch.inference_mode():
                    for begin in range(0, ids.shape[1] - 1, chunk):
                        model(input_ids=ids[:, begin : min(begin + chunk, ids.shape[1] - 1)], **cache_kwargs(cache),
                              use_cache=True)  # fmt: skip
                answers = generate_answers(model, cache, ids[:, -1:], tokenizer, layout)
                for (doc, fact), answer in zip(group, answers, strict=True):
                    ok = answer_holds(answer, fact, doc.facts)
                    right += ok
                    asked += 1
                    if len(examples) < 3:
                        examples.append({"question": fact.question(), "value": fact.value, "answer": answer,
                                         "correct": ok})  # fmt: skip
            low, high = wilson_interval(right, asked)
            rows.append({"kind": name, "length": length, "facts": num_facts, "control": not include_facts,
                         "correct": right, "asked": asked, "accuracy": right / max(1, asked), "ci95": [low, high],
                         "examples": examples})  # fmt: skip
            progress.update()
    progress.close()
    return rows


def fact_recall_rows(model: nn.Module, bounded: bool, tokenizer: Any, hay: list[int], args: EvalConfig,
                     window: int, deadline: float | None) -> list[dict]:  # fmt: skip
    """Fact recall (evaluation/fact_recall.py): single facts of every kind, the no-fact control, and
    documents of ``--fact-multi`` facts, each at least two windows before the question."""
    if args.fact_trials == 0:
        return []
    common = dict(lengths=args.fact_lengths, trials=args.fact_trials, min_distance=2 * window, seed=args.seed,
                  batch=args.batch, chunk=args.chunk, deadline=deadline)  # fmt: skip
    rows = fact_rows(model, bounded, tokenizer, hay, kinds=args.fact_kinds, **common)  # type: ignore[arg-type]
    if args.fact_control:
        rows += fact_rows(model, bounded, tokenizer, hay, kinds=args.fact_kinds, include_facts=False, **common)  # type: ignore[arg-type]
    if args.fact_multi > 1:
        rows += fact_rows(model, bounded, tokenizer, hay, kinds=args.fact_kinds, num_facts=args.fact_multi, **common)  # type: ignore[arg-type]
    return rows
