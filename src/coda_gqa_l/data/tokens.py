"""Texts as one token stream, the form training windows and evaluation haystacks are cut from."""

from __future__ import annotations


def token_stream(texts: list[str], tokenizer: object) -> list[int]:
    """All texts tokenized and joined with the end-of-sequence token between them."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        if eos is not None:
            ids.append(int(eos))
    return ids
