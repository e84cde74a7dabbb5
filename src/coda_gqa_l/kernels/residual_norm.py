"""The residual add and the next RMS norm of a Llama-family block in one pass (the whole-model graph step).

A decoder block adds the attention output to the residual stream and normalises the sum for the MLP, then adds the
MLP output and normalises for the next block. transformers' RMSNorm is six or seven small kernels (casts, square,
mean, rsqrt, two products) and the add one more; in a decode step, where each kernel is a node of a CUDA graph
that costs about as much as its work, ``add_rms_norm`` does both in one. The result is the module's: the sum
rounded to the residual's dtype, the norm in float32 rounded to it before the gain (``add_rms_norm_reference``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dispatch import dependent_launch_meta, launch, tile_size, use_triton

# transformers' RMSNorm classes of the families models.graph_decode supports: all compute
# weight * (x32 * rsqrt(mean(x32^2) + eps)).to(input dtype)
LLAMA_STYLE_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def fusable(norm: nn.Module) -> bool:
    """Whether ``norm`` is a transformers RMSNorm that ``add_rms_norm`` computes exactly."""
    return type(norm).__name__ in LLAMA_STYLE_NORMS and isinstance(getattr(norm, "weight", None), Tensor)


def rms_norm_eps(norm: nn.Module) -> float:
    """The epsilon of a transformers RMSNorm (``variance_epsilon`` in the Llama family)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def add_rms_norm_reference(h: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(h + delta, RMSNorm(h + delta))`` as transformers computes them (``delta`` None: no add)."""
    if delta is not None:
        h = h + delta.to(h.dtype)
    x = h.to(torch.float32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * normed.to(h.dtype)


def add_rms_norm(h: Tensor, delta: Tensor | None, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``h (..., D)`` plus ``delta`` (or nothing), and that sum normalised by ``norm`` (a ``fusable`` RMSNorm):
    one Triton pass on the Triton backend, else the reference. Returns (new residual, normalised)."""
    weight = norm.weight
    assert isinstance(weight, Tensor)  # fusable(norm)
    eps = rms_norm_eps(norm)
    if not use_triton(h.device):
        return add_rms_norm_reference(h, delta, weight, eps)
    from .residual_norm_triton import _add_rms_norm_kernel

    D = h.shape[-1]
    h = h.contiguous()
    rows = h.numel() // D
    delta_c = delta.to(h.dtype).contiguous() if delta is not None else h
    h_out = torch.empty_like(h) if delta is not None else h
    y = torch.empty(h.shape, device=h.device, dtype=torch.promote_types(weight.dtype, h.dtype))
    launch(
        _add_rms_norm_kernel,
        (rows,),
        h,
        delta_c,
        weight,
        h_out,
        y,
        eps,
        D,
        HAS_DELTA=delta is not None,
        BLOCK_D=tile_size(D),
        num_warps=4,
        **dependent_launch_meta(h.device),
    )
    return h_out, y
