"""``ByteTokenizer``: UTF-8 bytes as tokens, for tiny test models that have no real tokenizer."""

from __future__ import annotations


class ByteTokenizer:
    """Token ``i < 256`` is byte ``i``; 256 is end-of-sequence. Decoding replaces broken UTF-8."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = False, verbose: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
