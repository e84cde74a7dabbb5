"""The model of a from-scratch run: a random Llama of ``ScratchConfig``'s shape with its attention
converted to the variant under test (docs/training.md section 4).

Every variant starts from the same initial weights: the base is drawn from ``seed`` before the
conversion, which adds its own parameters from a separate generator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import BoundedConfig
from ..models.convert import convert
from .scratch_config import ScratchConfig


def build_model(config: ScratchConfig, vocab_size: int) -> nn.Module:
    """A random Llama of the requested shape, its attention converted to the chosen variant."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config.check_model()
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.width,
        intermediate_size=config.ffn,
        num_hidden_layers=config.depth,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.seq_len,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama)
    lam = min(max(config.lambda_init, 1e-4), 1 - 1e-4)
    bias = math.log(lam / (1 - lam))
    if config.attention == "gqa":
        convert(model, None, differential=False)
    else:  # from scratch: a normed head and a lambda well away from 0, as differential transformers train
        bounded = BoundedConfig.preset(config.config, num_sink=config.num_sink)
        if config.attention == "coda-bounded" and config.seq_len <= bounded.window:
            fits = f"--seq-len {config.seq_len} fits in the {config.config} window ({bounded.window})"
            raise ValueError(f"{fits}: the banks would never be written; use a longer sequence or a smaller --config")
        convert(model, bounded if config.attention == "coda-bounded" else None, head_norm="rms", lambda_init_bias=bias)
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()  # type: ignore[operator]
    return {"total": total, "non_embedding": total - embedding}
