"""A small random Llama with the byte tokenizer: smoke runs and tests of the training loop."""

from __future__ import annotations

import torch
from torch import nn

from .tokenizer import ByteTokenizer


def tiny_llama(seed: int = 0, max_position_embeddings: int = 8192) -> tuple[nn.Module, ByteTokenizer]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=ByteTokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_position_embeddings,
            eos_token_id=ByteTokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    return model.eval(), ByteTokenizer()
