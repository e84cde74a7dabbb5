"""On CUDA the bounded layer's fused path, and a converted model with a ``BoundedCache``, read a stream and decode
without a host synchronisation (``torch.cuda.set_sync_debug_mode("error")`` turns each into an error). Each one would
stall the queue of launches, the CPU waiting for the GPU and then the GPU for the CPU: in a small model, where
launches cost as much as the kernels, that undoes the overlap once per layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import token_like

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig

CONFIG = BoundedConfig(window=64, num_landmarks_exact=12, num_landmarks_summary=8, num_sink=4)


@contextmanager
def _no_sync() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _twice(run: Callable[[], None]) -> None:
    """Once to compile and autotune the kernels (autotuning times launches: it synchronises), then checked."""
    run()
    with _no_sync():
        run()


@pytest.mark.gpu
def test_the_fused_layer_reads_chunks_and_steps_without_synchronising() -> None:
    torch.manual_seed(0)
    layer = BoundedCoDAAttention(128, 8, 2, config=CONFIG).cuda().to(torch.bfloat16).eval()
    x = token_like(1, 300, 128, seed=1).cuda().to(torch.bfloat16)

    def run() -> None:
        state = layer.init_state(1)
        with torch.no_grad():
            _, state = layer.prefill_chunked(x[:, :290], state, block_size=128)
            for t in range(290, 300):
                _, state = layer.step(x[:, t : t + 1], state)

    _twice(run)


@pytest.mark.gpu
def test_a_converted_model_reads_and_decodes_through_its_forward_without_synchronising() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from coda_gqa_l.models import BoundedCache, convert
    from coda_gqa_l.models.hf_compat import cache_kwargs

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=101,
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
        )
    )
    model = convert(base, CONFIG).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 101, (1, 300), device="cuda")

    def run() -> None:
        cache = BoundedCache(model, block_size=128)
        with torch.no_grad():
            model(ids[:, :290], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            for t in range(290, 300):
                model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)

    _twice(run)
