"""How a document, a question, an answer and a follow-up are laid out as text, for one tokenizer.

The neural database asks with this layout and the fact documents of phase-2 training are built
with it, so the model is trained on exactly the prompts it is later asked with. With a chat
template (ChatML, as SmolLM2's) the document opens a user turn, the question closes it and the
assistant answers; an answer ends with ``<|im_end|>``. Without one, plain ``Question:`` /
``Answer:`` lines, and an answer ends at the end of its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptFormat:
    """The text around a document and its questions.

    ``follow_up`` starts with ``end_of_answer``: it closes the previous answer before asking again.
    ``stop_strings`` end generation; an answer also ends at the end of its first non-empty line.
    """

    document_prefix: str
    question: str
    follow_up: str
    stop_strings: tuple[str, ...] = ()
    answer_prefix: str = ""
    end_of_answer: str = "\n"

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> PromptFormat:
        template = str(getattr(tokenizer, "chat_template", "") or "")
        if "<|im_start|>" in template:
            return cls(
                document_prefix="<|im_start|>user\n",
                question="\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n",
                follow_up="<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                stop_strings=("<|im_end|>",),
                answer_prefix="",
                end_of_answer="<|im_end|>",
            )
        return cls(
            document_prefix="",
            question="\n\nQuestion: {question}\nAnswer:",
            follow_up="\nQuestion: {question}\nAnswer:",
            answer_prefix=" ",
            end_of_answer="\n",
        )


def control_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special added tokens (``<|im_start|>``, ``<|im_end|>``, ...) by their text: the tokens a
    prompt's layout writes and a user's text must not (``encode_prompt``). Empty for a tokenizer without them."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {token.content: int(i) for i, token in added.items() if getattr(token, "special", False)}


def encode_prompt(tokenizer: Any, parts: list[tuple[str, bool]]) -> list[int]:
    """Token ids of ``parts`` joined, each ``(text, from_user)``: control tokens are read only in the layout's
    parts, so a document or a question that contains ``<|im_end|>`` gets that text's ordinary tokens and cannot
    close its turn or open the assistant's. Text without control strings gets the ids the tokenizer gives the whole
    string (the same places split: at the layout's control tokens, as the tokenizer splits its input)."""
    controls = control_tokens(tokenizer)
    if not controls:
        return list(tokenizer.encode("".join(text for text, _ in parts), add_special_tokens=False, verbose=False))
    pattern = re.compile("(" + "|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)) + ")")
    pieces: list[str | int] = [""]  # text runs and control ids, in order
    for text, from_user in parts:
        for i, item in enumerate([text] if from_user else pattern.split(text)):
            if i % 2:  # a control token of the layout (re.split puts the captured separators at odd places)
                pieces += [controls[item], ""]
            else:
                pieces[-1] = str(pieces[-1]) + item
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(piece)
        elif piece:
            # split_special_tokens: a control string in the user's text is text (the layout's were split out above)
            ids += tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True, verbose=False)
    return ids
