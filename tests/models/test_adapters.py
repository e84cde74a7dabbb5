"""Model conversion on tiny random configs of every supported family (docs/adapters.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from coda_gqa_l import BoundedConfig, StateFileError, module_fingerprint
from coda_gqa_l.models import BoundedCache, LlamaCoDAAdapter, bounded_modules, convert, spec_from_config
from coda_gqa_l.models.hf_compat import cache_kwargs

COMMON = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def _build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON, rope_theta=100000.0))
    if arch == "llama3-scaled":
        scaling = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
        return LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=dict(rope_theta=500000.0, **scaling)))
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None, rope_theta=1e6))
    if arch == "mixtral":
        return MixtralForCausalLM(
            MixtralConfig(**COMMON, sliding_window=None, num_local_experts=4, num_experts_per_tok=2)
        )
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=False))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=24, use_sliding_window=False))
    if arch == "qwen3-moe":
        return Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **COMMON,
                head_dim=24,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                decoder_sparse_step=1,
            )
        )
    raise ValueError(arch)


ARCHS = ["llama", "llama3-scaled", "mistral", "mixtral", "qwen2", "qwen3", "qwen3-moe"]
SMALL = BoundedConfig(window=32, num_landmarks_exact=8, num_landmarks_summary=8)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_identity_conversion_keeps_the_function(arch: str) -> None:
    model = _build(arch).eval()
    ids = _ids(2, 50)
    with torch.no_grad():
        original = model(ids).logits
        unbounded = convert(copy.deepcopy(model), None, exact_identity=True)(ids).logits
        # before any token leaves the window the bounded model is the original too
        bounded = convert(
            copy.deepcopy(model),
            BoundedConfig(window=64, num_landmarks_exact=8, num_landmarks_summary=8),
            exact_identity=True,
        )(ids).logits
    assert (unbounded - original).abs().max().item() < 1e-4
    assert (bounded - original).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_default_conversion_is_near_identity(arch: str) -> None:
    model = _build(arch).eval()
    ids = _ids(1, 40)
    with torch.no_grad():
        original = model(ids).logits
        converted = convert(copy.deepcopy(model), None)(ids).logits
    rel = ((converted - original).norm() / original.norm()).item()
    assert 0 < rel < 0.02  # lambda = sigmoid(-6) of a noise stream


def test_spec_reads_shapes_and_rope_from_the_config() -> None:
    spec = spec_from_config(_build("qwen3").config)
    assert (spec.head_dim, spec.qk_norm, spec.num_kv_heads) == (24, True, 2)
    assert spec_from_config(_build("mistral").config).rope_base == 1e6
    assert spec_from_config(_build("llama3-scaled").config).rope_scaling["rope_type"] == "llama3"
    assert spec_from_config(_build("qwen2").config).qkv_bias and not spec_from_config(_build("qwen2").config).o_bias


@pytest.mark.parametrize(
    "config,message",
    [
        (MistralConfig(**COMMON, sliding_window=4096), "sliding-window"),
        (LlamaConfig(**COMMON, rope_parameters=dict(rope_theta=1e4, rope_type="dynamic", factor=2.0)), "dynamic NTK"),
        (GPT2Config(), "not supported"),
    ],
)
def test_unsupported_attention_is_refused(config, message: str) -> None:
    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config

    with pytest.raises(ValueError, match=message):
        if isinstance(config, LlamaConfig):
            convert(LlamaForCausalLM(config), None)
        else:
            convert(Holder(), None)


def test_bounded_generate_keeps_memory_flat_and_matches_recomputation() -> None:
    model = convert(_build("llama").eval(), SMALL)
    prompt = _ids(1, 150, 1)
    with torch.no_grad():
        cache = BoundedCache(model)
        out = model.generate(prompt, **cache_kwargs(cache), max_new_tokens=40, do_sample=False)
        # the same tokens by re-reading the whole sequence each time (no cache): chunk invariance
        ids = prompt
        for _ in range(40):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)
    assert bounded_modules(model)[0].config == SMALL
    with torch.no_grad():
        cache = BoundedCache(model)
        model(_ids(1, 100, 2), **cache_kwargs(cache))
        after_100 = cache.nbytes()
        model(_ids(1, 4900, 3), **cache_kwargs(cache))
        assert cache.get_seq_length() == 5000
        assert cache.nbytes() == after_100 > 0
        sampled = model.generate(
            prompt, **cache_kwargs(BoundedCache(model)), max_new_tokens=20, do_sample=True, top_k=20
        )
    assert sampled.shape == (1, 170)


def test_generate_without_a_bounded_cache_says_what_to_do() -> None:
    model = convert(_build("llama").eval(), SMALL)
    with pytest.raises(TypeError, match="BoundedCache"):
        model.generate(_ids(1, 10), max_new_tokens=3, use_cache=True)


def test_save_and_resume_the_whole_model_state(tmp_path) -> None:
    original = _build("qwen3").eval()
    model = convert(copy.deepcopy(original), SMALL)
    fingerprint = module_fingerprint(model)
    prompt = _ids(1, 200, 4)
    with torch.no_grad():
        straight = model.generate(prompt, **cache_kwargs(BoundedCache(model)), max_new_tokens=30, do_sample=False)
        cache = BoundedCache(model)
        model(prompt[:, :-1], **cache_kwargs(cache))
        cache.save(tmp_path / "doc.state", model_fingerprint=fingerprint)
        # a freshly converted copy of the same model continues from the file
        fresh = convert(copy.deepcopy(original), SMALL)
        assert module_fingerprint(fresh) == fingerprint
        resumed_cache = BoundedCache.load(tmp_path / "doc.state", fresh, model_fingerprint=fingerprint)
        resumed = fresh.generate(prompt, **cache_kwargs(resumed_cache), max_new_tokens=30, do_sample=False)
    assert torch.equal(resumed, straight)
    other = convert(_build("qwen3").eval(), BoundedConfig(window=64, num_landmarks_exact=8, num_landmarks_summary=8))
    with pytest.raises(StateFileError, match="another config"):
        BoundedCache.load(tmp_path / "doc.state", other, model_fingerprint=fingerprint)
    with pytest.raises(StateFileError, match="another model"):
        BoundedCache.load(tmp_path / "doc.state", fresh, model_fingerprint="0" * 64)


def test_padded_batches() -> None:
    model = _build("llama").eval()
    unbounded = convert(copy.deepcopy(model), None, exact_identity=True)
    short, long = _ids(1, 20, 5), _ids(1, 30, 6)
    batch = torch.cat([torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, :10] = 0
    with torch.no_grad():
        together = unbounded(batch, attention_mask=mask).logits
        alone = unbounded(short).logits
        reference = model(batch, attention_mask=mask).logits
    assert (together[0, 10:] - alone[0]).abs().max().item() < 1e-4
    assert (together[:, -1] - reference[:, -1]).abs().max().item() < 1e-4
    bounded = convert(copy.deepcopy(model), SMALL)
    with pytest.raises(ValueError, match="padded batches"):
        bounded(batch, attention_mask=mask)


def test_the_padding_mask_is_read_back_once_per_forward_not_once_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the mask's values on the host is a device synchronisation on a GPU: every layer of one forward gets the
    same mask tensor, so it is read once, at the first layer; every forward reads it again (a mask changed in place
    between forwards is seen, also one made under inference mode, which keeps no version)."""
    from coda_gqa_l.models import adapters

    reads: list[int] = []
    real = adapters._read_back
    monkeypatch.setattr(adapters, "_read_back", lambda flags: reads.append(flags.numel()) or real(flags))
    model = convert(_build("llama").eval(), SMALL)
    assert len(bounded_modules(model)) == 2
    ids = _ids(2, 30, 7)
    mask = torch.ones(2, 30, dtype=torch.long)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert reads == [1]  # one flag (on a GPU, two: the mask's and the input's finiteness)
        model(ids, attention_mask=mask)
        assert reads == [1, 1]
        mask[0, :4] = 0  # in place
        with pytest.raises(ValueError, match="padded batches"):
            model(ids, attention_mask=mask)
    assert len(reads) == 3
    with torch.inference_mode():
        made_here = torch.ones(2, 30, dtype=torch.long)
        model(ids, attention_mask=made_here)
        made_here[1, :2] = 0
        with pytest.raises(ValueError, match="padded batches"):
            model(ids, attention_mask=made_here)
    assert len(reads) == 5


def test_per_layer_adapter_from_llama_attention() -> None:
    model = _build("llama").eval()
    attn = model.model.layers[1].self_attn
    adapter = LlamaCoDAAdapter.from_llama_attention(attn, bounded=SMALL, exact_identity=True)
    assert adapter.layer_idx == 1 and adapter.bounded
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        y, _ = adapter(x)
        position = model.model.rotary_emb(x, torch.arange(20)[None])
        expected, _ = attn(x, position_embeddings=position, attention_mask=None)
    assert (y - expected).abs().max().item() < 1e-5


def test_generic_adapter_from_any_qkvo_attention() -> None:
    """``GenericCoDAAdapter`` (alias ``EveCoDAAdapter``, docs/api.md) reads only the four projections and the RoPE
    settings it is told: with the Llama layer's own settings it keeps the layer's function."""
    import coda_gqa_l
    from coda_gqa_l.models import GenericCoDAAdapter

    assert coda_gqa_l.EveCoDAAdapter is GenericCoDAAdapter is coda_gqa_l.GenericCoDAAdapter
    assert {"GenericCoDAAdapter", "EveCoDAAdapter"} <= set(coda_gqa_l.__all__)
    model = _build("llama").eval()
    attn = model.model.layers[0].self_attn
    config = model.config
    adapter = GenericCoDAAdapter.from_attention(
        attn,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        rope_base=spec_from_config(config).rope_base,  # rope_theta moved between transformers versions
        bounded=False,
        exact_identity=True,
    )
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        y, _ = adapter(x)
        position = model.model.rotary_emb(x, torch.arange(12)[None])
        expected, _ = attn(x, position_embeddings=position, attention_mask=None)
    assert not adapter.bounded and (y - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_generic_adapter_takes_the_rope_layout(layout: str) -> None:
    """A q/k/v/o attention whose RoPE turns pairs ``(2i, 2i+1)`` (GPT-J style) keeps its function only
    when the adapter is told its layout; a hand-written causal reference with that layout checks it."""
    from coda_gqa_l.models import GenericCoDAAdapter
    from coda_gqa_l.primitives import apply_rope, expand_pairs

    torch.manual_seed(0)
    D, H, Dh, L, base = 32, 4, 8, 10, 10000.0
    attn = torch.nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(attn, name, torch.nn.Linear(D, D, bias=False))
    adapter = GenericCoDAAdapter.from_attention(
        attn, num_heads=H, num_kv_heads=H, rope_base=base, rope_layout=layout, bounded=False, exact_identity=True
    )
    x = torch.randn(1, L, D)
    angles = torch.arange(L, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    cos, sin = (t.float() for t in expand_pairs(angles.cos(), angles.sin(), "interleaved"))
    heads = [proj(x).view(1, L, H, Dh).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
    q, k = (apply_rope(t, cos, sin, "interleaved") for t in heads[:2])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, heads[2], is_causal=True)
    with torch.no_grad():
        expected = attn.o_proj(out.transpose(1, 2).reshape(1, L, D))
        y, _ = adapter(x)
    error = (y - expected).abs().max().item()
    assert error < 1e-5 if layout == "interleaved" else error > 1e-2


def test_stream_perplexity_is_chunk_invariant() -> None:
    from transformers import DynamicCache

    from coda_gqa_l.evaluation import stream_nll

    model = _build("llama").eval()
    ids = _ids(1, 300, 7)
    whole = stream_nll(model, ids)
    streamed = stream_nll(model, ids, DynamicCache(config=model.config), chunk=64)
    assert whole.shape == streamed.shape == (299,)
    assert (whole - streamed).abs().max().item() < 1e-4
    bounded = convert(copy.deepcopy(model), SMALL)
    a = stream_nll(bounded, ids, BoundedCache(bounded), chunk=37)
    b = stream_nll(bounded, ids, BoundedCache(bounded), chunk=300)
    assert (a - b).abs().max().item() < 1e-4


def test_retune_routing_changes_the_thresholds_the_banks_use() -> None:
    from coda_gqa_l.config import parse_routing
    from coda_gqa_l.models.convert import retune_routing

    model = convert(_build("llama").eval(), SMALL)
    prompt = _ids(1, 300, 5)

    def exact_inserts() -> float:
        for layer in bounded_modules(model):
            layer.collect_metrics = True
        cache = BoundedCache(model)
        with torch.no_grad():
            model(prompt, **cache_kwargs(cache), use_cache=True)
        return sum(state.metrics["exact_inserts"] for state in cache.states)

    before = exact_inserts()
    stale = BoundedCache(model)
    with torch.no_grad():
        model(prompt[:, :100], **cache_kwargs(stale), use_cache=True)
    # with every cosine a hit, only the first segment's best candidate reaches each (empty) bank:
    # one insert per KV head per layer; an open novelty test lets more in
    retune_routing(model, novelty=-1.0, match=-1.0)
    assert exact_inserts() == COMMON["num_hidden_layers"] * COMMON["num_key_value_heads"]
    retune_routing(model, **parse_routing(["novelty=0.99", "match=0.999", "max_inserts=16"]))
    assert exact_inserts() > before
    assert all(layer.config.max_inserts == 16 for layer in bounded_modules(model))
    assert model.config.coda_gqa_l["bounded"]["novelty"] == 0.99
    with torch.no_grad(), pytest.raises(ValueError, match="another config"):
        model(prompt[:, 100:110], **cache_kwargs(stale), use_cache=True)
    with pytest.raises(ValueError, match="not a routing threshold"):
        retune_routing(model, window=64)
    with pytest.raises(ValueError, match="novelty <= match"):
        retune_routing(model, novelty=0.95, match=0.9)
    for bad in (["novelty"], ["window=3"], ["match=high"]):
        with pytest.raises(ValueError, match="--routing"):
            parse_routing(bad)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_adapter_reads_the_cache_under_either_transformers_name(keyword: str) -> None:
    # transformers 5.24 renamed past_key_values to cache; the adapter must write the state under both
    model = convert(_build("llama").eval(), SMALL)
    adapter = model.model.layers[0].self_attn
    x = torch.randn(1, 40, COMMON["hidden_size"], generator=torch.Generator().manual_seed(7))
    cache = BoundedCache(model)
    with torch.no_grad():
        y, _ = adapter(x, attention_mask=None, use_cache=True, **{keyword: cache})
        expected, _ = adapter.layer.prefill_chunked(x, adapter.layer.init_state(1))
    state = cache.layers[0].state
    assert state is not None and state.pos == 40
    torch.testing.assert_close(y, expected)


def test_adapter_refuses_a_cache_it_would_not_read() -> None:
    model = convert(_build("llama").eval(), SMALL)
    adapter = model.model.layers[0].self_attn
    x = torch.randn(1, 8, COMMON["hidden_size"])
    with torch.no_grad(), pytest.raises(TypeError, match="two different caches"):
        adapter(x, cache=BoundedCache(model), past_key_values=BoundedCache(model))
    with torch.no_grad(), pytest.raises(TypeError, match="'kv_cache'"):
        adapter(x, kv_cache=BoundedCache(model))
    with torch.no_grad(), pytest.raises(TypeError, match="received no cache"):
        adapter(x, use_cache=True)
