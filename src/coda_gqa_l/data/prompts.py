"""How a document, a question, an answer and a follow-up are laid out as text, for one tokenizer.

The neural database asks with this layout and the fact documents of phase-2 training are built
with it, so the model is trained on exactly the prompts it is later asked with. With a chat
template (ChatML, as SmolLM2's) the document opens a user turn, the question closes it and the
assistant answers; an answer ends with ``<|im_end|>``. Without one, plain ``Question:`` /
``Answer:`` lines, and an answer ends at the end of its line.
"""

from __future__ import annotations

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
