"""Where a bounded model's ingest time goes, beside the original model reading the same chunk: one chunk, profiled.

    python benchmarks/profile_ingest.py [--context 8192] [--chunk 1024] [--repeats 3] [--out DIR]
    python benchmarks/profile_ingest.py --quick      # CPU, tiny random Llama: a few seconds (the test runs this)

SmolLM2 (bfloat16 on CUDA, float32 on the CPU) reads ``--context`` tokens of held-out Wikipedia in ``--chunk``-token
chunks twice: converted to bounded CoDA with the shipped weights through ``BoundedCache``, and as the original model
through transformers' ``DynamicCache``. The next chunk is then read again ``--repeats`` times from a copy of each
cache, once under ``torch.profiler`` and once without it (the wall time: the profiler slows every launch it records);
each figure is the median over those reads. On CUDA a third column reads the chunk with one replay of the whole
model's captured chunk graph (``GraphModelDecoder.read``, as the neural database ingests there), and a last table
times one answer token's graph-decoded step (its wall time, and the host's own time per call when it does not wait)
and lists its kernels with their calls per step. Per model: the chunk's wall time; on
CUDA the device-busy time (kernel times added up), the kernel launches and the host synchronisations (counted with
``torch.cuda.set_sync_debug_mode("warn")`` in a separate read, since each stalls the queue of launches); the time per
family of kernels (CUDA) or operators (CPU): bank routing, attention, RoPE, matrix products, copies, elementwise and
reductions, other; and the 15 kernels or operators with the most time. What the issue asks of a missed target
("what limits it: kernel times, launches"), for one chunk.

Writes ``DIR/profile_ingest.json``; the table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_common import run_header, write_result
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from coda_gqa_l.models import BoundedCache
from coda_gqa_l.models.graph_decode import GraphModelDecoder, graph_decode_supported
from coda_gqa_l.models.hf_compat import cache_kwargs

REPO = Path(__file__).resolve().parents[1]

# kernel or operator name -> family, first match wins. Triton kernels keep their Python names: kernels/routing_triton
# (_route_chunk_kernel), diff_attention_triton (_fwd_kernel, the _bwd_* kernels), combine_triton (_combine_*),
# rope_triton (_rotate_*)
FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("routing", re.compile(r"route|routing", re.I)),
    ("attention", re.compile(r"^_fwd_kernel|^_bwd_|^_combine|diff_attn|attention|flash|fmha|sdpa|softmax", re.I)),
    ("rope", re.compile(r"rope|^_rotate", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|sm90_xmma|cublas|aten::(mm|bmm|addmm|matmul|linear|baddbmm)\b", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|cat|index|gather|scatter|stack|clone|contiguous|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|aten::(add|mul|sub|div|where|silu|pow|rsqrt|mean)")),
)


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if pattern.search(name):
            return label
    return "other"


Models = tuple[nn.Module, nn.Module, Tensor, str]


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Models:
    """The bounded model, the original, and ``context + chunk`` token ids on ``device``."""
    tokens = args.context + args.chunk
    if args.quick:
        from model_generate import random_ids, tiny_llama

        from coda_gqa_l.config import BoundedConfig
        from coda_gqa_l.models import convert

        original = tiny_llama().to(dtype)
        config = BoundedConfig(window=64, num_landmarks_exact=16, num_landmarks_summary=16, num_sink=4)
        bounded = convert(copy.deepcopy(original), config)
        ids, _ = random_ids(original.config.vocab_size, tokens)
        name = "tiny random Llama (4/2 heads, 2 layers, D 64), untrained conversion"
    else:
        from model_generate import wikipedia_ids

        from coda_gqa_l.models.loader import load_smollm2
        from coda_gqa_l.models.pretrained import load_coda_smollm2

        bounded, tokenizer = load_coda_smollm2(dtype=dtype, progress=False)
        original, _ = load_smollm2(dtype=dtype, progress=False)
        ids, _ = wikipedia_ids(tokenizer, tokens)
        name = "SmolLM2-135M-Instruct, shipped weights (bounded) and the original"
    return bounded.to(device).eval(), original.to(device).eval(), ids.to(device), name


def read(model: nn.Module, cache: Any, ids: Tensor, chunk: int) -> None:
    for start in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)


class Reader:
    """How a column reads the profiled chunk: the model's forward, or (``graphs``) ``GraphModelDecoder.read``, one
    replay of the whole model's captured chunk graph (what the neural database does on CUDA, models/graph_prefill.py).
    ``start(cache)`` prepares a copy of the context's cache for one read (a graph decoder adopts it: untimed)."""

    def __init__(self, model: nn.Module, graphs: bool = False) -> None:
        self.model, self.graphs = model, graphs
        self.decoder: GraphModelDecoder | None = None

    def start(self, cache: Any) -> Any:
        cache = fork(cache)
        if self.graphs:
            if self.decoder is None:
                self.decoder = GraphModelDecoder(self.model, cache)
            else:
                self.decoder.adopt(cache)
        return cache

    def __call__(self, cache: Any, piece: Tensor) -> None:
        if self.decoder is not None:
            self.decoder.read(piece)
        else:
            read(self.model, cache, piece, piece.shape[1])


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs(reader: Reader, cache: Any, piece: Tensor, device: torch.device) -> int | None:
    """Synchronising CUDA calls while ``reader`` reads ``piece`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronise(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            reader(cache, piece)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def timed_read(reader: Reader, cache: Any, piece: Tensor, device: torch.device) -> float:
    """Seconds to read ``piece`` from ``cache``, without the profiler (which slows every launch it records)."""
    synchronise(device)
    began = time.perf_counter()
    reader(cache, piece)
    synchronise(device)
    return time.perf_counter() - began


COPIES = re.compile(r"^Memcpy|^Memset", re.I)  # device events that are not kernel launches


def profile_chunk(reader: Reader, cache: Any, piece: Tensor, device: torch.device) -> dict[str, Any]:
    """One read of ``piece`` from ``cache`` under the profiler: device time, launches (a replayed graph's kernels
    count as launches), families, top 15."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronise(device)
    with profile(activities=activities) as prof:
        reader(cache, piece)
        synchronise(device)
    per_name: dict[str, float] = defaultdict(float)
    launches = 0
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_name[event.name] += event.time_range.elapsed_us() / 1e6
                launches += not COPIES.search(event.name)
    else:
        for row in prof.key_averages():
            if row.key.startswith("aten::") and row.self_cpu_time_total > 0:
                per_name[row.key] += row.self_cpu_time_total / 1e6
    families: Counter[str] = Counter()
    for name, seconds in per_name.items():
        families[family(name)] += seconds
    top = sorted(per_name.items(), key=lambda item: -item[1])[:15]
    return {
        "busy_s": sum(per_name.values()),
        "launches": launches if device.type == "cuda" else None,
        "families_s": dict(families),
        "top": [{"name": name[:120], "s": seconds, "family": family(name)} for name, seconds in top],
    }


def fork(cache: Any) -> Any:
    """An independent copy of a cache, so that every profiled read starts from the same context."""
    return cache.fork() if isinstance(cache, BoundedCache) else copy.deepcopy(cache)


def measure(reader: Reader, make_cache: Any, ids: Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """Read the context, then profile the next chunk ``--repeats`` times, each from a copy of the context's cache."""
    context, piece = ids[:, : args.context], ids[:, args.context : args.context + args.chunk]
    with torch.inference_mode():
        cache = make_cache(reader.model)
        read(reader.model, cache, context, args.chunk)
        timed_read(reader, reader.start(cache), piece, device)  # compiles, captures, tunes: not counted
        runs = []
        for _ in range(args.repeats):
            run = profile_chunk(reader, reader.start(cache), piece, device)
            run["wall_s"] = timed_read(reader, reader.start(cache), piece, device)
            runs.append(run)
        syncs = host_syncs(reader, reader.start(cache), piece, device)
    median = {key: statistics.median(run[key] for run in runs) for key in ("wall_s", "busy_s")}
    names = {name for run in runs for name in run["families_s"]}
    median_families = {name: statistics.median(run["families_s"].get(name, 0.0) for run in runs) for name in names}
    launches = [run["launches"] for run in runs if run["launches"] is not None]
    return {
        "chunk_wall_s": median["wall_s"],
        "chunk_busy_s": median["busy_s"],
        "tokens_per_s": args.chunk / median["wall_s"],
        "launches": statistics.median(launches) if launches else None,
        "host_syncs": syncs,
        "families_s": dict(sorted(median_families.items(), key=lambda item: -item[1])),
        "top": runs[len(runs) // 2]["top"],
        "runs": [{key: run[key] for key in ("wall_s", "busy_s", "launches")} for run in runs],
    }


def profile_decode(
    model: nn.Module, make_cache: Any, context: Tensor, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One answer token's step through the whole model's CUDA graphs after ``context``: wall time per step (median
    of ``args.decode_steps`` replays, the host waiting only at the end as an answer loop does with the argmax on
    the device), and the kernels of 20 replayed steps under the profiler (per step)."""
    with torch.inference_mode():
        cache = make_cache(model)
        read(model, cache, context, args.chunk)
    decoder = GraphModelDecoder(model, cache)
    decoder.capture_all()
    token = context[:, -1]
    for _ in range(8):
        decoder(token)
    steps = args.decode_steps
    times = []
    for _ in range(3):
        synchronise(device)
        began = time.perf_counter()
        for _ in range(steps):
            decoder(token)
        synchronise(device)
        times.append((time.perf_counter() - began) / steps)
    host = []  # the host's own time per step: 20 calls queued behind a synchronisation, not waited for
    for _ in range(3):
        synchronise(device)
        began = time.perf_counter()
        for _ in range(20):
            decoder(token)
        host.append((time.perf_counter() - began) / 20)
    synchronise(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            decoder(token)
        synchronise(device)
    per_name: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    kernels = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name] += event.time_range.elapsed_us() / 1e6 / 20
            calls[event.name] += 1 / 20
            kernels += not COPIES.search(event.name)
    families: Counter[str] = Counter()
    for name, seconds in per_name.items():
        families[family(name)] += seconds
    step_s = statistics.median(times)
    return {
        "context": context.shape[1],
        "step_wall_s": step_s,
        "tokens_per_s": 1 / step_s,
        "step_host_s": statistics.median(host),
        "step_busy_s": sum(per_name.values()),
        "kernels_per_step": kernels / 20,
        "families_s": dict(sorted(families.items(), key=lambda item: -item[1])),
        "top": [
            {"name": name[:120], "s": seconds, "calls": calls[name], "family": family(name)}
            for name, seconds in sorted(per_name.items(), key=lambda item: -item[1])[:15]
        ],
    }


def table(result: dict[str, Any]) -> list[str]:
    models = result["models"]
    names = list(models)
    families = sorted(
        {f for m in models.values() for f in m["families_s"]},
        key=lambda f: -max(m["families_s"].get(f, 0.0) for m in models.values()),
    )
    unit = "device" if result["device"].startswith("cuda") else "CPU self"
    lines = [
        f"one {result['chunk']}-token chunk after {result['context']:,} tokens, {result['device']} {result['dtype']}, "
        f"median of {result['repeats']}",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| chunk wall ms | " + " | ".join(f"{models[n]['chunk_wall_s'] * 1e3:.1f}" for n in names) + " |",
        "| tokens/s | " + " | ".join(f"{models[n]['tokens_per_s']:,.0f}" for n in names) + " |",
        f"| {unit} time ms | " + " | ".join(f"{models[n]['chunk_busy_s'] * 1e3:.1f}" for n in names) + " |",
        "| kernel launches | " + " | ".join(str(models[n]["launches"]) for n in names) + " |",
        "| host synchronisations | " + " | ".join(str(models[n]["host_syncs"]) for n in names) + " |",
    ]
    for f in families:
        cells = (f"{models[n]['families_s'].get(f, 0.0) * 1e3:.1f}" for n in names)
        lines.append(f"| {f} ms | " + " | ".join(cells) + " |")
    for n in names:
        lines += ["", f"{n}: top kernels or operators", "", "| name | family | ms |", "|---|---|---|"]
        lines += [f"| `{row['name']}` | {row['family']} | {row['s'] * 1e3:.2f} |" for row in models[n]["top"]]
    decode = result.get("decode")
    if decode:
        lines += [
            "",
            f"bounded, one decode step through the whole model's CUDA graphs after {decode['context']:,} tokens: "
            f"{decode['step_wall_s'] * 1e3:.2f} ms wall ({decode['tokens_per_s']:,.0f} tokens/s), "
            f"{decode['step_busy_s'] * 1e3:.2f} ms device busy, {decode['step_host_s'] * 1e3:.2f} ms of host work "
            f"(calls not waited for), {decode['kernels_per_step']:.0f} kernels per step",
            "",
            "| family | ms per step |",
            "|---|---|",
        ]
        lines += [f"| {f} | {sec * 1e3:.3f} |" for f, sec in decode["families_s"].items()]
        lines += ["", "| decode kernel | family | ms per step | calls per step |", "|---|---|---|---|"]
        for row in decode["top"]:
            lines.append(f"| `{row['name']}` | {row['family']} | {row['s'] * 1e3:.3f} | {row['calls']:.0f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192, help="tokens read before the profiled chunk (default 8192)")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk, as the database reads (default 1024)")
    p.add_argument("--repeats", type=int, default=3, help="profiled reads of the chunk per model (default 3)")
    p.add_argument("--decode-steps", type=int, default=200, help="graph-decoded steps timed, CUDA (default 200)")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 512 + 128 tokens, one repeat: a smoke test")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/profile_ingest", help="folder for the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.chunk, args.repeats = 512, 128, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bounded, original, ids, name = load(args, device, dtype)

    def bounded_cache(model: nn.Module) -> BoundedCache:
        return BoundedCache(model, block_size=args.chunk)

    models = {"bounded (BoundedCache)": measure(Reader(bounded), bounded_cache, ids, args, device)}
    graphs = device.type == "cuda" and graph_decode_supported(bounded)
    if graphs:
        models["bounded (graph read)"] = measure(Reader(bounded, graphs=True), bounded_cache, ids, args, device)
    models["original (DynamicCache)"] = measure(Reader(original), lambda m: DynamicCache(config=m.config), ids, args,
                                                device)  # fmt: skip
    decode = profile_decode(bounded, bounded_cache, ids[:, : args.context], args, device) if graphs else None
    result = {
        **run_header("profile_ingest.py", sys.argv[1:] if argv is None else argv, device, dtype),
        "model": name,
        "context": args.context,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "models": models,
        "decode": decode,
    }
    write_result(result, args.out / "profile_ingest.json", table(result))


if __name__ == "__main__":
    main()
