"""Where a from-scratch training step spends its time (issue 8): GQA against CoDA, kernel by kernel.

scratch_compare.py measures CoDA's step-time ratio over GQA; this script says what the extra time
is. Each variant is the same ``coda-scratch`` model (same shape, same initial weights, random
tokens: the kernels do not depend on the text). After untimed warm-up updates it times updates
with the device synchronised, then profiles a few and sums kernel time by kind: attention
(SDPA / flash kernels), matmuls (GEMMs) and the rest (element-wise work, norms, copies,
reductions). Two ideals set the measured ratio in context: the FLOP-proportional one of
scratch_compare.py, and the one where only GQA's attention kernel time doubles.

Prints a table and writes OUT/scratch_step_profile.json:

    python benchmarks/scratch_step_profile.py --out $OUT --depth 8 --width 512 --heads 8 --kv-heads 4 \\
        --seq-len 1024 --global-batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scratch_compare import flops_per_token  # noqa: E402

KINDS = ("attention", "matmul", "other")
# the environment of each way CoDA's attention can run (kernels/dispatch.py)
PATHS = {
    "fused": {"CODA_GQA_L_KERNELS": "auto", "CODA_GQA_L_UNBOUNDED_ATTENTION": "fused"},
    "sdpa": {"CODA_GQA_L_KERNELS": "auto", "CODA_GQA_L_UNBOUNDED_ATTENTION": "sdpa"},
    "torch": {"CODA_GQA_L_KERNELS": "torch", "CODA_GQA_L_UNBOUNDED_ATTENTION": "fused"},
}
# our Triton differential attention's kernels (kernels/diff_attention_triton.py) carry no attention word
ATTENTION_MARKS = ("flash", "fmha", "attention", "attn", "sdpa", "_fwd_kernel", "_bwd_dkdv", "_bwd_extras", "_bwd_dq")
MATMUL_MARKS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm")


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    if any(mark in name for mark in ATTENTION_MARKS):
        return "attention"
    if any(mark in name for mark in MATMUL_MARKS):
        return "matmul"
    return "other"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["gqa", "coda"], choices=["gqa", "coda", "coda-bounded"])
    p.add_argument("--coda-paths", nargs="+", default=["fused"], choices=list(PATHS),
                   help="how CoDA's attention runs: each is its own row (GQA always runs the default)")  # fmt: skip
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's tokenizer: 49,152)")
    p.add_argument("--warmup", type=int, default=5, help="untimed updates")
    p.add_argument("--steps", type=int, default=10, help="timed updates")
    p.add_argument("--profiled", type=int, default=3, help="profiled updates")
    p.add_argument("--out", type=Path, default=Path("runs/scratch-step-profile"))
    return p.parse_known_args(argv)  # the rest: coda-scratch's model options


def measure(variant: str, passthrough: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from coda_gqa_l.training.scratch import parse_args as scratch_options
    from coda_gqa_l.training.scratch_model import build_model

    options = dataclasses.replace(scratch_options(passthrough, check=False), attention=variant)
    model = build_model(options, args.vocab).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab, (options.global_batch, options.seq_len + 1), generator=generator).to(device)

    def update() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()

    for _ in range(args.warmup):
        update()
    seconds = []
    for _ in range(args.steps):
        _synchronize(device)
        began = time.perf_counter()
        update()
        _synchronize(device)
        seconds.append(time.perf_counter() - began)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(args.profiled):
            update()
        _synchronize(device)
    kernels = _kernel_times(profiler, device)
    by_kind = {k: sum(t for name, t in kernels.items() if kind_of(name) == k) / args.profiled for k in KINDS}
    top = sorted(kernels.items(), key=lambda item: -item[1])[:15]
    summary = {"model": {"depth": options.depth, "width": options.width, "heads": options.heads,
                         "kv_heads": options.kv_heads, "ffn": options.ffn, "seq_len": options.seq_len,
                         "vocab": args.vocab}}  # fmt: skip
    return {
        "variant": variant,
        "median_step_s": statistics.median(seconds),
        "step_s": seconds,
        "kernel_s_per_step": by_kind,
        "top_kernels": [{"name": name, "kind": kind_of(name), "s_per_step": t / args.profiled} for name, t in top],
        "flops_per_token": flops_per_token(summary, variant != "gqa"),
    }


def _kernel_times(profiler: Any, device: torch.device) -> dict[str, float]:
    """Seconds per kernel name over the profiled updates (CPU: self time of each operator)."""
    times: dict[str, float] = {}
    for event in profiler.key_averages():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            micros = event.self_cpu_time_total
        if micros > 0:
            times[event.key] = times.get(event.key, 0.0) + micros / 1e6
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(rows: list[dict[str, Any]], command: str, device_name: str) -> str:
    gqa = next((r for r in rows if r["variant"] == "gqa"), rows[0])
    lines = [
        f"Command: `{command}`  ",
        f"Device: {device_name}. Kernel time per update from the profiler; step time: median of synchronised updates.",
        "",
        "| variant | median step | step / GQA | FLOP ideal | attention-time ideal | attention | matmul | other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = gqa["kernel_s_per_step"]
    for r in rows:
        kinds = r["kernel_s_per_step"]
        # the ideal where only attention's kernel time grows (doubles for a differential variant)
        attention_ideal = (gqa["median_step_s"] + (base["attention"] if r["variant"] != "gqa" else 0.0)) / gqa[
            "median_step_s"
        ]
        cells = " | ".join(
            f"{kinds[k] * 1000:.1f} ms ({(kinds[k] - base[k]) * 1000:+.1f})" for k in KINDS
        )  # fmt: skip
        lines.append(
            f"| {r['label']} | {r['median_step_s'] * 1000:.1f} ms | {r['median_step_s'] / gqa['median_step_s']:.3f}x "
            f"| {r['flops_per_token'] / gqa['flops_per_token']:.3f}x | {attention_ideal:.3f}x | {cells} |"
        )
    lines += ["", "Top kernels per variant (time per update):", ""]
    for r in rows:
        lines += [f"{r['label']}:", "", "| kernel | kind | ms |", "|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['kind']} | {k['s_per_step'] * 1000:.2f} |" for k in r["top_kernels"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        for path in ["fused"] if variant == "gqa" else args.coda_paths:
            os.environ.update(PATHS[path])  # read at every call, so it takes effect at once
            row = measure(variant, passthrough, args, device)
            rows.append({**row, "path": path, "label": variant if variant == "gqa" else f"{variant} ({path})"})
    os.environ.update(PATHS["fused"])
    command = "python benchmarks/scratch_step_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(rows, command, device_name)
    (args.out / "scratch_step_profile.json").write_text(
        json.dumps({"command": command, "device": device_name, "torch": torch.__version__, "rows": rows}, indent=1)
    )
    (args.out / "scratch_step_profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
