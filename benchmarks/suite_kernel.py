"""The kernel section of the suite: fused differential attention against PyTorch SDPA.

The problem is the one a CoDA layer solves: ``2H`` stacked query heads (per KV group its ``G``
signal heads, then its ``G`` noise heads) over ``Hkv`` key/value heads, causal, batch 1.

- ``sdpa``: ``F.scaled_dot_product_attention`` on the stacked queries (``enable_gqa=True``),
  which leaves out the ``signal - lambda * noise`` combine;
- ``fused``: ``coda_gqa_l.kernels.diff_attention.differential_attention(q, k, v, lam, scale=)``,
  which includes it (``not available`` until that module exists).

FLOPs follow the FlashAttention convention: forward ``4 * Hq * L^2 * Dh / 2`` for a causal
mask with ``Hq = 2H`` query heads; backward 2.5 times the forward, so forward+backward 3.5 times.
The fused output is checked once per head size against a float32 reference, next to the error
of the bf16 SDPA path against the same reference (the 2x rule of docs/kernels.md section 3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import Deadline, Settings, describe, error_fields, measure, release_memory, skipped
from suite_decode import optional_attr
from suite_layers import DEADLINE_REASON

log = logging.getLogger("suite")

BACKWARD_OVER_FORWARD = 2.5


def causal_attention_flops(query_heads: int, length: int, head_dim: int) -> float:
    return 4 * query_heads * length * length * head_dim / 2


class StackedProblem:
    """Random inputs of one stacked problem: q ``(1, Hkv, 2G, L, Dh)``, k and v
    ``(1, Hkv, L, Dh)``, lambda ``(1, H, L)`` float32 in (0, 1)."""

    def __init__(self, num_heads: int, num_kv_heads: int, length: int, head_dim: int, settings: Settings):
        device, dtype = settings.device, settings.torch_dtype
        self.num_heads, self.num_kv_heads, self.length, self.head_dim = num_heads, num_kv_heads, length, head_dim
        streams = 2 * num_heads // num_kv_heads
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q = torch.randn(1, num_kv_heads, streams, length, head_dim, device=device, dtype=dtype)
        self.k = torch.randn(1, num_kv_heads, length, head_dim, device=device, dtype=dtype)
        self.v = torch.randn(1, num_kv_heads, length, head_dim, device=device, dtype=dtype)
        self.lam = torch.rand(1, num_heads, length, device=device).clamp_min(1e-3)

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(1, 2H, L, Dh)``: one SDPA call over the stacked query heads."""
        b, hkv, streams, length, d = q.shape
        stacked = q.reshape(b, hkv * streams, length, d)
        return F.scaled_dot_product_attention(stacked, k, v, is_causal=True, scale=self.scale, enable_gqa=True)

    def combine(self, stacked_out: torch.Tensor) -> torch.Tensor:
        """SDPA output ``(1, 2H, L, Dh)`` -> ``signal - lambda * noise`` as ``(1, L, H, Dh)`` float32."""
        b, _, length, d = stacked_out.shape
        groups = stacked_out.float().view(b, self.num_kv_heads, 2, -1, length, d)
        signal = groups[:, :, 0].reshape(b, self.num_heads, length, d)
        noise = groups[:, :, 1].reshape(b, self.num_heads, length, d)
        return (signal - self.lam[..., None] * noise).transpose(1, 2)

    def float32_reference(self) -> torch.Tensor:
        # K and V repeated by hand, so that a float32 kernel without GQA support can take it
        repeat = 2 * self.num_heads // self.num_kv_heads
        k = self.k.float().repeat_interleave(repeat, dim=1)
        v = self.v.float().repeat_interleave(repeat, dim=1)
        b, hkv, streams, length, d = self.q.shape
        q = self.q.float().reshape(b, hkv * streams, length, d)
        return self.combine(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale))


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm())


def _timed(fn: Callable[[], object], flops: float, settings: Settings) -> dict[str, Any]:
    try:
        timing = measure(fn, settings)
    except Exception as exc:
        return error_fields(exc)
    return {"status": "ok", **timing, "tflops": flops / (timing["median_ms"] * 1e-3) / 1e12}


def _implementations(problem: StackedProblem) -> dict[str, tuple[Callable[..., torch.Tensor] | None, str | None]]:
    fused, why_not = optional_attr("coda_gqa_l.kernels.diff_attention", "differential_attention")

    def run_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        assert fused is not None
        return fused(q, k, v, lam, scale=problem.scale)

    def run_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return problem.sdpa(q, k, v)

    return {"sdpa": (run_sdpa, None), "fused": (run_fused if fused is not None else None, why_not)}


def _measure_problem(problem: StackedProblem, settings: Settings, check: bool) -> list[dict[str, Any]]:
    forward_flops = causal_attention_flops(2 * problem.num_heads, problem.length, problem.head_dim)
    inputs = (problem.q, problem.k, problem.v, problem.lam)
    reference = problem.float32_reference() if check else None
    rows = []
    for impl, (run, why_not) in _implementations(problem).items():
        base = {"impl": impl}
        if run is None:
            rows += [base | {"direction": d} | skipped(why_not or "") for d in ("fwd", "fwd+bwd")]
            continue
        with torch.no_grad():
            forward = _timed(lambda r=run: r(*inputs), forward_flops, settings)
            if reference is not None and forward["status"] == "ok":
                out = run(*inputs)
                value = problem.combine(out) if impl == "sdpa" else out
                forward["rel_err_vs_float32"] = _relative_error(value, reference)
        rows.append(base | {"direction": "fwd"} | forward)
        rows.append(base | {"direction": "fwd+bwd"} | _timed_backward(run, inputs, forward_flops, settings))
    return rows


def _timed_backward(
    run: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], forward_flops: float, settings: Settings
) -> dict[str, Any]:
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    try:
        with torch.no_grad():
            grad = torch.randn_like(run(*inputs))
    except Exception as exc:
        return error_fields(exc)

    def forward_backward() -> None:
        # every input's gradient (lambda's is unused by SDPA); .grad is never accumulated
        torch.autograd.grad(run(*leaves), leaves, grad, allow_unused=True)

    return _timed(forward_backward, forward_flops * (1 + BACKWARD_OVER_FORWARD), settings)


def kernel_section(
    heads: tuple[int, int], head_dims: list[int], lengths: list[int], settings: Settings, deadline: Deadline
) -> list[dict[str, Any]]:
    num_heads, num_kv_heads = heads
    rows = []
    for head_dim in head_dims:
        for length in lengths:
            where = {"section": "kernel", "num_heads": num_heads, "num_kv_heads": num_kv_heads}
            where |= {"head_dim": head_dim, "length": length}
            if deadline.section_expired():
                rows += [
                    where | {"impl": i, "direction": d} | skipped(DEADLINE_REASON)
                    for i in ("sdpa", "fused")
                    for d in ("fwd", "fwd+bwd")
                ]
                continue
            problem = StackedProblem(num_heads, num_kv_heads, length, head_dim, settings)
            for row in _measure_problem(problem, settings, check=length == min(lengths)):
                rows.append(where | row)
                log.info(describe(rows[-1]))
            del problem
            release_memory(settings.device)
    return rows
