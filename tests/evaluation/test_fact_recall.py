"""Fact recall scoring (evaluation/fact_recall.py) on the tiny random model: every cell is asked and scored."""

from __future__ import annotations

from tiny_training import TEXT

from coda_gqa_l.config import BoundedConfig
from coda_gqa_l.data.prompts import PromptFormat
from coda_gqa_l.evaluation.fact_recall import cut_answer, fact_rows
from coda_gqa_l.models import convert
from coda_gqa_l.models.tiny import tiny_llama


def test_every_asked_question_is_scored_in_batches() -> None:
    model, tok = tiny_llama(seed=0, max_position_embeddings=4096)
    model = convert(model, BoundedConfig(window=64, num_landmarks_exact=8, num_landmarks_summary=8, num_sink=2))
    hay = tok.encode(TEXT)
    rows = fact_rows(model, True, tok, hay, kinds=("person", "year"), lengths=(900,), trials=3, min_distance=128,
                     batch=2, chunk=256)  # fmt: skip
    assert [(r["kind"], r["asked"]) for r in rows] == [("person", 3), ("year", 3)]
    assert all(0 <= r["correct"] <= r["asked"] and len(r["examples"]) == 3 for r in rows)
    several = fact_rows(model, True, tok, hay, kinds=("person", "year", "colour"), lengths=(900,), trials=2,
                        num_facts=3, min_distance=128, batch=4, chunk=256, include_facts=False)  # fmt: skip
    assert several[0]["kind"] == "3 facts" and several[0]["asked"] == 6 and several[0]["control"]


def test_answers_are_cut_at_their_stop() -> None:
    _, tok = tiny_llama()
    layout = PromptFormat.for_tokenizer(tok)
    assert cut_answer("  Tobias Wren\nQuestion: more", tok, layout) == "Tobias Wren"
    chat = PromptFormat("", "{question}", "<|im_end|>{question}", ("<|im_end|>",), "", "<|im_end|>")
    assert cut_answer("1987<|im_end|>\n<|im_start|>", tok, chat) == "1987"
