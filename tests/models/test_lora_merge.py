"""Folding LoRA adapters into their projections for inference (models/lora.py, ``merge_lora``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from coda_gqa_l.config import BoundedConfig
from coda_gqa_l.models import BoundedCache, convert
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.lora import LoRALinear, add_lora, merge_lora
from coda_gqa_l.models.tiny import tiny_llama


def _adapted_model() -> nn.Module:
    torch.manual_seed(0)
    config = BoundedConfig(window=32, num_landmarks_exact=8, num_landmarks_summary=8, num_sink=2, segment=8)
    model = convert(tiny_llama()[0], config)
    add_lora(model, rank=4)
    with torch.no_grad():  # adapters that change the outputs (B starts at zero)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.05)
    return model.eval()


def test_a_merged_model_computes_what_its_adapters_did() -> None:
    adapted = _adapted_model()
    merged = copy.deepcopy(adapted)
    assert merge_lora(merged) == 8  # q/k/v/o of 2 layers
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    ids = torch.randint(0, adapted.config.vocab_size, (2, 100))
    outputs = []
    for model in (adapted, merged):
        cache = BoundedCache(model)
        with torch.no_grad():
            first = model(input_ids=ids[:, :70], **cache_kwargs(cache), use_cache=True).logits
            second = model(input_ids=ids[:, 70:], **cache_kwargs(cache), use_cache=True).logits
        outputs.append(torch.cat([first, second], dim=1))
    unmerged_effect = (outputs[0] - _plain_logits(adapted, ids)).abs().max()
    assert unmerged_effect > 1e-3  # the adapters matter, so agreeing below is not trivial
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


def _plain_logits(adapted: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The same model with its adapters' B zeroed: what the base projections alone give."""
    plain = copy.deepcopy(adapted)
    with torch.no_grad():
        for module in plain.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.zero_()
    cache = BoundedCache(plain)
    with torch.no_grad():
        first = plain(input_ids=ids[:, :70], **cache_kwargs(cache), use_cache=True).logits
        second = plain(input_ids=ids[:, 70:], **cache_kwargs(cache), use_cache=True).logits
    return torch.cat([first, second], dim=1)


def test_merging_a_model_without_adapters_changes_nothing() -> None:
    model = convert(tiny_llama()[0], None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_lora(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
