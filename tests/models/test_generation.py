"""``bounded_generate``: the same tokens as transformers' ``generate`` with a ``BoundedCache``, through the forward
and through the whole-model decoder's step (run eagerly in Triton's interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from coda_gqa_l import BoundedConfig
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache, bounded_generate, convert
from coda_gqa_l.models import graph_decode as graph_decode_module
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.tiny import tiny_llama

CONFIG = BoundedConfig(window=32, segment=8, num_landmarks_exact=4, num_landmarks_summary=4, num_sink=2)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model, _ = tiny_llama(seed=5)
    model = convert(model, CONFIG).eval()
    with torch.no_grad():  # sharper logits than the random init's, so greedy ties cannot decide
        model.lm_head.weight.mul_(20.0)
    return model


def test_greedy_tokens_equal_transformers_generate(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 200, (2, 50), generator=torch.Generator().manual_seed(0))
    eos = model.generation_config.eos_token_id  # transformers stops a row there and pads it with the same token
    ours = bounded_generate(model, ids, 20, chunk_tokens=16, eos_token_id=eos)
    with torch.no_grad():
        theirs = model.generate(ids, **cache_kwargs(BoundedCache(model)), do_sample=False, max_new_tokens=20)
    assert torch.equal(ours, theirs)


def test_the_graph_step_gives_the_forwards_tokens(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode path of a CUDA machine, run eagerly: the same tokens, and the cache is left holding its own
    tensors at the same position."""
    ids = torch.randint(0, 200, (1, 27), generator=torch.Generator().manual_seed(1))
    forward_cache = BoundedCache(model)
    expected = bounded_generate(model, ids, 24, cache=forward_cache, chunk_tokens=16)
    original_init = graph_decode_module.GraphModelDecoder.__init__

    def eager_init(self, model, cache, *, capture=True):  # type: ignore[no-untyped-def]
        original_init(self, model, cache, capture=False)

    monkeypatch.setattr("coda_gqa_l.models.generation.graph_decode_supported", lambda model: True)
    monkeypatch.setattr(graph_decode_module.GraphModelDecoder, "__init__", eager_init)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    graph_cache = BoundedCache(model)
    assert torch.equal(bounded_generate(model, ids, 24, cache=graph_cache, chunk_tokens=16), expected)
    assert [s.pos for s in graph_cache.states] == [s.pos for s in forward_cache.states] == [27 + 23] * 2


def test_rows_stop_at_the_end_token_and_sampling_is_seeded(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(2))
    free = bounded_generate(model, ids, 12)
    eos = int(free[0, 30 + 3])  # the fourth new token
    stopped = bounded_generate(model, ids, 12, eos_token_id=eos)
    first = free[0, 30:].tolist().index(eos)
    assert torch.equal(stopped, free[:, : 30 + first + 1])  # the same tokens, up to and with the end token
    a = bounded_generate(model, ids, 8, temperature=1.0, seed=3)
    assert torch.equal(a, bounded_generate(model, ids, 8, temperature=1.0, seed=3))
    with pytest.raises(ValueError, match="temperature"):
        bounded_generate(model, ids, 8, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(batch, length >= 1\)"):
        bounded_generate(model, ids[0], 8)
