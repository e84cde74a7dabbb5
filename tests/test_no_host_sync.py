"""On CUDA the bounded layer's fused path reads a stream and decodes without a host synchronisation
(``torch.cuda.set_sync_debug_mode("error")`` turns each into an error), and a converted model with a ``BoundedCache``
makes one per forward (its first layer reads back whether the input is finite and the mask padded), not one per
layer. Each would stall the queue of launches, the CPU waiting for the GPU and then the GPU for the CPU: in a small
model, where launches cost as much as the kernels, that undoes the overlap."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import token_like

from coda_gqa_l import BoundedCoDAAttention, BoundedConfig
from coda_gqa_l.differential import finite_checked_upstream

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
        # a direct call tests its input for NaN or Inf (one read back per call) unless the caller has, as here
        with torch.no_grad(), finite_checked_upstream():
            _, state = layer.prefill_chunked(x[:, :290], state, block_size=128)
            for t in range(290, 300):
                _, state = layer.step(x[:, t : t + 1], state)

    _twice(run)


@pytest.mark.gpu
def test_a_converted_model_reads_back_once_per_forward_not_once_per_layer() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from coda_gqa_l.models import BoundedCache, convert
    from coda_gqa_l.models.hf_compat import cache_kwargs

    torch.manual_seed(0)
    layers = 3
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=101,
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
        )
    )
    model = convert(base, CONFIG).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 101, (1, 300), device="cuda")
    mask = torch.ones_like(ids)
    forwards = 11

    def run() -> None:
        cache = BoundedCache(model, block_size=128)
        with torch.no_grad():
            model(ids[:, :290], attention_mask=mask[:, :290], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            for t in range(290, 300):
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache), use_cache=True)

    run()  # compiles and tunes the kernels (autotuning times launches: it synchronises)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchronizing" in str(w.message) for w in caught)
    assert syncs <= forwards, f"{syncs} synchronisations in {forwards} forwards of a {layers}-layer model"
