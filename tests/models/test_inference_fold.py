"""A converted model folded for inference (models/inference.py): adapters merged, each bounded layer's input
projections and each MLP's gate and up projections as one product; the same outputs, no weight held twice."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_bounded_llama
from torch import nn

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache
from coda_gqa_l.models.graph_decode import GraphModelDecoder
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.inference import Folded, fold_for_inference
from coda_gqa_l.models.lora import LoRALinear, add_lora


def _adapted_model(differential_lambda: bool = True) -> nn.Module:
    model = tiny_bounded_llama(seed=4)
    add_lora(model, rank=4)
    with torch.no_grad():  # adapters and a lambda gate that change the outputs
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.05)
        for block in model.model.layers:
            core = block.self_attn.layer.core
            if differential_lambda and core.lambda_proj is not None:
                core.lambda_proj.weight.normal_(std=0.2)
                core.lambda_proj.bias.fill_(-1.0)
    return model.eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A 70-token prompt in chunks of 16 (routing into the banks), then 10 tokens one by one."""
    cache = BoundedCache(model, block_size=16)
    with torch.no_grad():
        out = [model(input_ids=ids[:, :70], **cache_kwargs(cache), use_cache=True).logits]
        for t in range(70, ids.shape[1]):
            out.append(model(input_ids=ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits)
    return torch.cat(out, dim=1)


def _unique_weight_elements(model: nn.Module) -> int:
    """Elements of the model's weight matrices (biases aside: a fused bias has zeros for projections without one)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.dim() == 2)


def test_a_folded_model_computes_what_it_did() -> None:
    adapted = _adapted_model()
    layers = len(adapted.model.layers)
    folded = copy.deepcopy(adapted)
    assert fold_for_inference(folded) == Folded(adapters=4 * layers, attention=layers, mlps=layers)
    ids = torch.randint(0, adapted.config.vocab_size, (2, 80))
    torch.testing.assert_close(_logits(folded, ids), _logits(adapted, ids), rtol=1e-4, atol=1e-4)
    block = folded.model.layers[0]
    assert block.self_attn.layer.input_projection is not None and hasattr(block.mlp, "gate_up_proj")
    assert fold_for_inference(folded) == Folded(0, 0, 0)  # folding twice changes nothing


def test_folding_holds_no_weight_twice() -> None:
    merged = _adapted_model()
    from coda_gqa_l.models.lora import merge_lora

    merge_lora(merged)
    before = _unique_weight_elements(merged)
    fold_for_inference(merged)
    assert _unique_weight_elements(merged) == before


def _prompted_and_expected(model: nn.Module, ids: torch.Tensor) -> tuple[BoundedCache, torch.Tensor]:
    """A cache that read the first 21 tokens, and the forward's next-token logits for the rest, one step each
    (from a second cache): what a graph decoder continuing the first cache must give."""
    cache, reference = BoundedCache(model, block_size=16), BoundedCache(model, block_size=16)
    with torch.no_grad():
        model(ids[:, :21], **cache_kwargs(cache), use_cache=True)
        model(ids[:, :21], **cache_kwargs(reference), use_cache=True)
        want = [
            model(ids[:, t : t + 1], **cache_kwargs(reference), use_cache=True).logits[:, -1].float()
            for t in range(21, ids.shape[1])
        ]
    return cache, torch.stack(want, 1)


def test_graph_decode_of_a_folded_model_equals_its_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-model step reads the fused products too (on the CPU in Triton's interpreter)."""
    assert dispatch.interpreting() or torch.cuda.is_available()
    model = _adapted_model()
    fold_for_inference(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 200, (2, 40))
    cache, want = _prompted_and_expected(model, ids)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    decoder = GraphModelDecoder(model, cache, capture=False)
    got = [decoder(ids[:, t]) for t in range(21, 40)]
    torch.testing.assert_close(torch.stack(got, 1), want, atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_steps_of_a_folded_model_equal_its_forward(dtype: torch.dtype) -> None:
    """On CUDA the folded products, the window buffer's step and the fused MLP activation run captured."""
    model = _adapted_model().to("cuda", dtype)
    fold_for_inference(model)
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 100), device="cuda")
    cache, want = _prompted_and_expected(model, ids)
    decoder = GraphModelDecoder(model, cache)
    got = torch.stack([decoder(ids[:, t]) for t in range(21, 100)], 1)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got, want, **tol)
    assert {kind for _, kind in decoder._graphs} == {"route", "refresh", "step"}


def test_the_gate_logits_hook_sees_a_folded_layers_gates() -> None:
    """``recorded_gate_logits`` (needle_trace, the gate's training loss) reads the gate columns of the fused product."""
    from coda_gqa_l.training.gate_supervision import recorded_gate_logits

    adapted = _adapted_model()
    folded = copy.deepcopy(adapted)
    fold_for_inference(folded)
    ids = torch.randint(0, 200, (1, 24))
    seen = []
    for model in (adapted, folded):
        with torch.no_grad(), recorded_gate_logits(model) as logits:
            model(ids, **cache_kwargs(BoundedCache(model)), use_cache=True)
        seen.append(logits)
    assert len(seen[1]) == len(seen[0]) == len(adapted.model.layers)
    for got, want in zip(seen[1], seen[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_folded_model_is_not_saved_as_coda_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its parameters no longer split into base weights and adapters: saving it would lose the trained function."""
    from coda_gqa_l.models.weights import save_coda_weights

    model = _adapted_model()
    save_coda_weights(model, tmp_path / "before.safetensors", base="tiny")  # unfolded: fine
    fold_for_inference(model)
    with pytest.raises(ValueError, match="folded for inference"):
        save_coda_weights(model, tmp_path / "after.safetensors", base="tiny")
    assert not (tmp_path / "after.safetensors").exists()
