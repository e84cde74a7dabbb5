"""Where the bounded layer's GPU time goes (7B-layer shape, medium config, bf16): a profiler table
per part, for finding what to optimize next; the suite (run_suite.py) is the benchmark.

    python benchmarks/profile_layer.py [kernel] [prefill] [decode]

``kernel``: fused differential attention against SDPA on the same stacked problem, forward and
forward+backward. ``prefill``: bounded prefill at 2K and 32K against a GQA layer, then the CUDA
kernels of one prefill. ``decode``: a CapturedDecoder replay and one eager step's kernels.
Writes ``$OUT/profile.json`` (or /tmp)."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton.testing

from coda_gqa_l import BaselineGQA, BoundedCoDAAttention, BoundedConfig
from coda_gqa_l.kernels.diff_attention import differential_attention


def bench(fn, rep=50):  # type: ignore[no-untyped-def]
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def attn_flops(length: int, heads: int, dim: int) -> float:
    return 4.0 * length * length / 2 * dim * heads


def kernel_rows(out: list) -> None:  # type: ignore[type-arg]
    B, Hkv, G, D = 1, 8, 4, 128
    for L in (2048, 8192):
        q = torch.randn(B, Hkv, 2 * G, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lam = torch.rand(B, Hkv * G, L, device="cuda")
        scale = D**-0.5

        def ours(q=q, k=k, v=v, lam=lam, scale=scale):  # type: ignore[no-untyped-def]
            return differential_attention(q, k, v, lam, scale=scale)

        def sdpa(q=q, k=k, v=v, scale=scale, L=L):  # type: ignore[no-untyped-def]
            return F.scaled_dot_product_attention(
                q.reshape(B, Hkv * 2 * G, L, D), k, v, is_causal=True, scale=scale, enable_gqa=True
            )

        fl = attn_flops(L, 2 * G * Hkv, D)
        with torch.no_grad():
            t_ours, t_sdpa = bench(ours), bench(sdpa)
        o1, o2 = ours(), sdpa()
        g1, g2 = torch.randn_like(o1), torch.randn_like(o2)
        inputs = (q, k, v)
        tb_ours = bench(lambda f=ours, g=g1, i=inputs: torch.autograd.grad(f(), i, g))
        tb_sdpa = bench(lambda f=sdpa, g=g2, i=inputs: torch.autograd.grad(f(), i, g))
        row = dict(
            L=L,
            fwd_ours_ms=t_ours,
            fwd_sdpa_ms=t_sdpa,
            fb_ours_ms=tb_ours,
            fb_sdpa_ms=tb_sdpa,
            fwd_ours_tflops=fl / t_ours / 1e9,
            fwd_sdpa_tflops=fl / t_sdpa / 1e9,
            fb_ours_tflops=3.5 * fl / tb_ours / 1e9,
            fb_sdpa_tflops=3.5 * fl / tb_sdpa / 1e9,
        )
        out.append(row)
        print(json.dumps(row), flush=True)


def prefill_rows(out: list) -> None:  # type: ignore[type-arg]
    D, H, Hkv = 4096, 32, 8
    cfg = BoundedConfig.preset("medium")
    layer = BoundedCoDAAttention(D, H, Hkv, config=cfg).cuda().bfloat16()
    base = BaselineGQA(D, H, Hkv).cuda().bfloat16()
    for L in (2048, 32768):
        x = torch.randn(1, L, D, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            t_gqa = bench(lambda x=x: base(x), rep=100)
            t0 = time.perf_counter()
            layer.prefill_chunked(x, layer.init_state(1), block_size=L, return_outputs=False)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            t_ours = bench(
                lambda x=x, L=L: layer.prefill_chunked(x, layer.init_state(1), block_size=L, return_outputs=False),
                rep=200,
            )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.inference_mode():
                layer.prefill_chunked(x, layer.init_state(1), block_size=L, return_outputs=False)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        row = dict(L=L, gqa_ms=t_gqa, bounded_ms=t_ours, ratio=t_gqa / t_ours, first_call_s=first)
        out.append(row)
        print(json.dumps(row), flush=True)
        print(table, flush=True)


def decode_rows(out: list) -> None:  # type: ignore[type-arg]
    from coda_gqa_l.decode import CapturedDecoder

    D, H, Hkv = 4096, 32, 8
    layer = BoundedCoDAAttention(D, H, Hkv, config=BoundedConfig.preset("medium")).cuda().bfloat16()
    layer.fuse_input_projections()  # as the suite's decode rows (and the database's folded model) run it
    x = torch.randn(1, 2048, D, device="cuda", dtype=torch.bfloat16)
    x_t = torch.randn(1, 1, D, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        _, state = layer.prefill_chunked(x, layer.init_state(1), block_size=2048, return_outputs=False)
    decoder = CapturedDecoder(layer, state)
    for _ in range(3 * layer.config.segment):
        decoder(x_t)
    t_graph = bench(lambda: decoder(x_t), rep=200)
    # the plain step (reads the segment's kept extras; they are the live segment's after the replays above) and the
    # step that starts a segment and routes
    for kind in ("step", "route"):
        with torch.no_grad():
            for _ in range(3):
                decoder._step(kind)
            torch.cuda.synchronize()
            t_eager = bench(lambda k=kind: decoder._step(k), rep=100)  # type: ignore[misc]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    decoder._step(kind)
                torch.cuda.synchronize()
        row = dict(part="decode", kind=kind, graph_ms=t_graph, eager_ms=t_eager)
        out.append(row)
        print(json.dumps(row), flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    rows: list = []  # type: ignore[type-arg]
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for part in sys.argv[1:] or ["kernel", "prefill"]:
        {"kernel": kernel_rows, "prefill": prefill_rows, "decode": decode_rows}[part](rows)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "profile.json"), "w") as f:
        json.dump(rows, f, indent=1)
