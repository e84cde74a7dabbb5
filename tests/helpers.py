"""Shared builders for the tests: small layers over a matrix of shapes and configs, and
token-like inputs that make every routing event happen."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from coda_gqa_l import BaselineGQA, BoundedCoDAAttention, BoundedConfig, CoDAGQA


@dataclass(frozen=True)
class Shape:
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None


SHAPES = {
    "gqa": Shape(64, 4, 2, None),
    "mha-odd-heads": Shape(48, 3, 3, 16),
    "mqa-dh-not-d-over-h": Shape(40, 6, 1, 12),
}

CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(window=32, num_landmarks_exact=8, num_landmarks_summary=4),
    "window-only": dict(window=32, num_landmarks_exact=0, num_landmarks_summary=0),
    "sinks-banks": dict(window=32, num_landmarks_exact=6, num_landmarks_summary=4, num_sink=3),
    "exact-only": dict(window=32, num_landmarks_exact=8, num_landmarks_summary=0),
    "summary-only": dict(window=32, num_landmarks_exact=0, num_landmarks_summary=6),
    "absolute": dict(window=32, num_landmarks_exact=8, num_landmarks_summary=4, position_mode="absolute"),
    "plain-gqa": dict(window=32, num_landmarks_exact=8, num_landmarks_summary=4, differential=False),
}

SEQ_LEN = 300  # more than 8x the window: many segments of evictions


def make_layer(shape: str, config: str, seed: int = 0, **extra: Any) -> BoundedCoDAAttention:
    torch.manual_seed(seed)
    s = SHAPES[shape]
    layer = BoundedCoDAAttention(
        s.embed_dim, s.num_heads, s.num_kv_heads, head_dim=s.head_dim, collect_metrics=True, **CONFIGS[config], **extra
    )
    with torch.no_grad():
        # spread the write gates over (0, 1) so that thresholds and orderings all matter
        layer.gate_proj.weight.mul_(4.0)
    return layer


def token_like(batch: int, length: int, dim: int, seed: int, vocab: int = 20, noise: float = 0.05) -> torch.Tensor:
    """Inputs drawn from a small vocabulary plus noise: repeats make exact-bank hits and
    near-duplicates; the noise keeps every score away from exact ties."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, dim, generator=gen)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    return table[tokens] + noise * torch.randn(batch, length, dim, generator=gen)


def unbounded_twin(layer: BoundedCoDAAttention) -> torch.nn.Module:
    """The unbounded layer with the same weights (invariant 1)."""
    core = layer.core
    cls = CoDAGQA if layer.config.differential else BaselineGQA
    head_norm = "identity" if isinstance(core.head_norm, torch.nn.Identity) else "rms"
    twin = cls(
        core.embed_dim,
        core.num_heads,
        core.num_kv_heads,
        head_dim=core.head_dim,
        rope_base=core.rope.base,
        rope_layout=core.rope.layout,
        head_norm=head_norm,
    )
    missing, _ = twin.load_state_dict(layer.state_dict(), strict=False)
    assert not missing
    return twin


def routing_events_missing(layer: BoundedCoDAAttention, metrics: dict[str, float]) -> list[str]:
    """Routing events that did not happen (an invariance test with empty banks proves nothing)."""
    wanted = ["evicted"]
    if layer.config.num_landmarks_exact:
        wanted += ["exact_inserts", "exact_hits", "exact_overwrites"]
    if layer.config.num_landmarks_summary:
        wanted += ["summary_seeds", "summary_updates"]
    return [event for event in wanted if metrics.get(event, 0) <= 0]


@cache
def margin_safe_case(shape: str, config: str, batch: int = 2) -> tuple[int, int]:
    """(layer seed, input seed) whose run makes every routing event happen and whose routing
    scores all stay >= 1e-4 from every decision boundary, so that float rounding between
    chunkings cannot change a decision (docs/semantics.md section 3)."""
    for seed in range(60):
        layer = make_layer(shape, config, seed)
        x = token_like(batch, SEQ_LEN, layer.core.embed_dim, seed)
        with torch.no_grad():
            _, state = layer.prefill_chunked(x, layer.init_state(batch), block_size=SEQ_LEN)
        if state.metrics.get("min_margin", float("inf")) >= 1e-4 and not routing_events_missing(layer, state.metrics):
            return seed, seed
    raise AssertionError(f"no margin-safe seed with every routing event found for {shape}/{config}")


def bounded_config(config: str) -> BoundedConfig:
    return BoundedConfig(**CONFIGS[config])


GRAPH_CONFIG = BoundedConfig(window=32, segment=8, num_landmarks_exact=4, num_landmarks_summary=4, num_sink=2)


def tiny_bounded_llama(
    seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32, config: BoundedConfig = GRAPH_CONFIG
) -> torch.nn.Module:
    """The tiny Llama converted to bounded CoDA, in eval mode, with a write gate that opens for some tokens so the
    banks fill within a few segments (the graph decode and prefill tests need routing into the banks)."""
    from coda_gqa_l.models import convert
    from coda_gqa_l.models.tiny import tiny_llama

    model, _ = tiny_llama(seed=seed)
    model = convert(model, config).to(device=device, dtype=dtype)
    with torch.no_grad():
        for adapter in (block.self_attn for block in model.model.layers):
            adapter.layer.gate_proj.weight.mul_(8.0)
    return model.eval()


def window_step_targets(
    batch: int, kv_heads: int, window: int, head_dim: int, device: str, dtype: torch.dtype, seed: int
) -> list[torch.Tensor]:
    """Random targets of a graph step's window write, in ``WindowTargets``' order: ring keys, values and gates, the
    row positions (all 77), and the segment window buffer's keys and values."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    return [
        rand(batch, kv_heads, window, head_dim),
        rand(batch, kv_heads, window, head_dim),
        rand(batch, kv_heads, window, dt=torch.float32),
        torch.full((batch,), 77, dtype=torch.int64, device=device),
        rand(batch, kv_heads, window, head_dim),
        rand(batch, kv_heads, window, head_dim),
    ]


def run_benchmark_in_interpreter(script: str, *args: str, timeout: float = 300) -> Any:
    """``python benchmarks/SCRIPT ARGS`` in a child process with the package on its path and the Triton kernels run
    in Triton's interpreter (a benchmark's ``--quick`` smoke run); the finished process, checked for success."""
    return _run_benchmark(script, args, timeout, {"TRITON_INTERPRET": "1", "CODA_GQA_L_KERNELS": "triton"})


def run_benchmark_compiling(script: str, *args: str, timeout: float = 600) -> Any:
    """``python benchmarks/SCRIPT ARGS`` in a child process with the package on its path and without Triton's
    interpreter: for the scripts that record launches and compile them with Triton's real compiler (for a GPU
    architecture, on the CPU); the finished process, checked for success."""
    return _run_benchmark(script, args, timeout, {}, drop=("TRITON_INTERPRET",))


def _run_benchmark(
    script: str, args: tuple[str, ...], timeout: float, extra_env: dict[str, str], drop: tuple[str, ...] = ()
) -> Any:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])
    env.update(extra_env)
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), *args], capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def record_rotated_forwards(monkeypatch: Any) -> list[bool]:
    """Whether each launch of the attention forward from now on (``diff_attention._forward``) rotates the queries in
    its prologue (a ``Rotation`` given) or reads them stacked: the list fills as the forward runs."""
    from coda_gqa_l.kernels import diff_attention

    rotated: list[bool] = []
    forward = diff_attention._forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        rotated.append(len(args) > 17 and args[17] is not None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(diff_attention, "_forward", recording)
    return rotated
