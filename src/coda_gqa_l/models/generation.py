"""``bounded_generate``: prompt in, tokens out, with the bounded state and the fastest decode path there is.

``model.generate(ids, cache=BoundedCache(model))`` works too (transformers drives our cache), but it runs the
model's forward for every new token. This function prefills the prompt through the forward in chunks (memory flat
in the prompt's length), then decodes through the whole model's CUDA graphs (``graph_decode.GraphModelDecoder``)
where ``kernels.dispatch.graph_decode`` allows it, else through the forward. The tokens are the same either way, up
to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .cache import BoundedCache
from .graph_decode import GraphModelDecoder, graph_decode_supported
from .hf_compat import cache_kwargs


def bounded_generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    cache: BoundedCache | None = None,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    seed: int = 0,
    chunk_tokens: int = 1024,
) -> Tensor:
    """``input_ids (B, L)`` followed by up to ``max_new_tokens`` new tokens per row: ``(B, L + n)``.

    Greedy at ``temperature`` 0, else sampled from ``softmax(logits / temperature)`` with a generator seeded by
    ``seed``. A row that produced ``eos_token_id`` goes on with it; generation stops when every row has. ``cache``
    (a ``BoundedCache``, empty or holding earlier text) is continued and left holding everything but the last token.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1 or chunk_tokens < 1:
        raise ValueError(f"max_new_tokens and chunk_tokens must be positive, got {max_new_tokens}, {chunk_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cache = cache if cache is not None else BoundedCache(model, block_size=chunk_tokens)
    device = input_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        logits: Any = None
        for start in range(0, input_ids.shape[1], chunk_tokens):
            piece = input_ids[:, start : start + chunk_tokens]
            logits = model(piece, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    decoder = GraphModelDecoder(model, cache) if graph_decode_supported(model) else None

    def next_logits(tokens: Tensor) -> Tensor:
        if decoder is not None:
            return decoder(tokens)
        with torch.inference_mode():
            return model(tokens[:, None], **cache_kwargs(cache), use_cache=True).logits[:, -1]

    produced: list[Tensor] = []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    try:
        for step in range(max_new_tokens):
            if step:
                logits = next_logits(produced[-1])
            token = _pick(logits.float(), temperature, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            produced.append(token)
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        if decoder is not None:
            decoder.release()  # the cache keeps tensors of its own
    return torch.cat([input_ids, torch.stack(produced, dim=1)], dim=1)


def _pick(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
