"""Where an answer's time goes between the whole-model graph step and ``generate()``: the same graph-decoded model
after the same document, four loops around it, in one process.

    PYTHONPATH=src python benchmarks/answer_overhead.py [--context 8192] [--tokens 128] [--repeats 3] [--out DIR]

Loops (each on a fork of the document's state, greedy; the first untimed run of each captures and compiles):

* ``graph loop``: ``decoder(token).argmax(-1)`` and nothing else; the host never waits for a token;
* ``graph loop, token to host``: the same, reading each token on the host (``int(token)``), as any loop that stops
  at an end-of-sequence token must: the host then waits for every step before it launches the next;
* ``bounded_generate``: ``models.generation.bounded_generate`` (its own loop, an end-of-sequence check per token);
* ``generate()``: transformers' ``generate(custom_generate=bounded_decoding)`` with the model's generation config
  (its logits processors and stopping criteria per token), inside ``dispatch.steps_ahead(True)``: each step launched
  before the host has read the token it follows (``DecodeSteps.ahead``; the default);
* ``generate(), no steps ahead``: the same inside ``dispatch.steps_ahead(False)``: the host waits for each token.

For the last three, ``fixed ms`` is a call that makes one new token (prompt read, decoder lent and given back,
transformers' set-up) and ``ms/token`` is the slope ``(t(1 + n) - t(1)) / n``; for the loops, the time per token.
Medians of ``--repeats``; ratios against ``graph loop`` measured in the same run. Then a one-token call part by part
(transformers' set-up alone, a decoder lent and given back, with one step, the whole calls). ``--random-weights``:
SmolLM2's shapes with random base weights, no model files; ``--profile N``: cProfile of N one-token calls. Prints a
table last; writes ``DIR/answer_overhead.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_common import run_header, write_result
from torch import Tensor, nn

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache, bounded_decoding, bounded_generate, graph_prefill
from coda_gqa_l.models.graph_decode import GraphDecoderPool, graph_decode_supported, shared_decoder_pool
from coda_gqa_l.models.hf_compat import cache_kwargs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "answer_overhead"


def graph_loop(model: nn.Module, cache: BoundedCache, last: Tensor, tokens: int, to_host: bool) -> None:
    with shared_decoder_pool(model).lend(cache) as decoder:
        assert decoder is not None
        token = last
        for _ in range(tokens):
            token = decoder(token).argmax(-1)
            if to_host:
                int(token[0])


def generate_call(model: nn.Module, cache: BoundedCache, seq: Tensor, tokens: int, ahead: bool = True) -> None:
    generate: Any = model.generate  # type: ignore[operator]
    with dispatch.steps_ahead(ahead):
        generate(
            seq, attention_mask=torch.ones_like(seq), **cache_kwargs(cache), custom_generate=bounded_decoding,
            do_sample=False, min_new_tokens=tokens, max_new_tokens=tokens,
        )  # fmt: skip


def timed(run: Callable[[BoundedCache], None], document: BoundedCache, device: torch.device, repeats: int) -> float:
    """Median seconds of ``run`` on a fork of ``document``, forked before the clock starts (a fork is 450 tensor
    copies: the benchmark's, not the loop's)."""
    from model_generate import clock

    run(document.fork())  # captures, compiles, allocator
    times = []
    for _ in range(repeats):
        cache = document.fork()
        start = clock(device)
        run(cache)
        times.append(clock(device) - start)
    return statistics.median(times)


def measure(model: nn.Module, document: BoundedCache, seq: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    device, n = seq.device, args.tokens
    last = seq[:, -1]
    rows: dict[str, Any] = {}
    for name, to_host in (("graph loop", False), ("graph loop, token to host", True)):
        seconds = timed(lambda cache, h=to_host: graph_loop(model, cache, last, n, h), document, device, args.repeats)
        rows[name] = {"ms_per_token": 1000 * seconds / n}

    def ours(cache: BoundedCache, k: int) -> None:
        bounded_generate(model, seq[:, -1:], k, cache=cache)  # its input ids are the tokens the cache lacks

    calls: dict[str, Callable[[BoundedCache, int], None]] = {
        "bounded_generate": ours,
        "generate()": lambda cache, k: generate_call(model, cache, seq, k),
        "generate(), no steps ahead": lambda cache, k: generate_call(model, cache, seq, k, ahead=False),
    }
    for name, call in calls.items():
        one = timed(lambda cache, c=call: c(cache, 1), document, device, args.repeats)
        many = timed(lambda cache, c=call: c(cache, 1 + n), document, device, args.repeats)
        rows[name] = {"fixed_ms": 1000 * one, "ms_per_token": 1000 * (many - one) / n}
    base = rows["graph loop"]["ms_per_token"]
    for row in rows.values():
        row["tokens_per_s"] = 1000 / row["ms_per_token"]
        row["vs_graph_loop"] = base / row["ms_per_token"]
    return rows


def profile_fixed_cost(model: nn.Module, document: BoundedCache, seq: Tensor, args: argparse.Namespace) -> None:
    """Where a one-token call's fixed time goes, by function (host time; a wait for the GPU shows in the function
    that waits): ``args.profile`` calls of each loop under cProfile, the 40 largest cumulative times to a file."""
    import cProfile
    import io
    import pstats

    from model_generate import clock

    calls: dict[str, Callable[[BoundedCache], None]] = {
        "bounded_generate": lambda cache: bounded_generate(model, seq[:, -1:], 1, cache=cache),
        "generate": lambda cache: generate_call(model, cache, seq, 1, ahead=dispatch.launch_steps_ahead()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, call in calls.items():
        call(document.fork())  # warm
        forks = [document.fork() for _ in range(args.profile)]  # forked outside the profile: not the call's cost
        clock(seq.device)
        profiler = cProfile.Profile()
        profiler.enable()
        for cache in forks:
            call(cache)
        clock(seq.device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        (args.out / f"{name}.prof.txt").write_text(text.getvalue())
        print(f"{name}: {args.profile} one-token calls profiled -> {args.out / f'{name}.prof.txt'}")


def fixed_cost_parts(model: nn.Module, document: BoundedCache, seq: Tensor, repeats: int) -> dict[str, float]:
    """Milliseconds (medians of ``repeats``, the GPU idle at start and end) of the pieces a one-token call is made
    of, each on its own: transformers' ``generate()`` up to the loop it hands over to (a loop that returns at once),
    a decoder lent and given back (adopt and release), the same with the one step that reads the token the cache
    lacks, and the two whole calls."""

    def handed_over(*_: Any, **__: Any) -> Tensor:
        return seq

    def generate_set_up(cache: BoundedCache) -> None:
        generate: Any = model.generate  # type: ignore[operator]
        generate(
            seq, attention_mask=torch.ones_like(seq), **cache_kwargs(cache), custom_generate=handed_over,
            do_sample=False, min_new_tokens=1, max_new_tokens=1,
        )  # fmt: skip

    def lent(cache: BoundedCache, step: bool) -> None:
        with shared_decoder_pool(model).lend(cache) as decoder:
            assert decoder is not None
            if step:
                decoder(seq[:, -1])

    parts: dict[str, Callable[[BoundedCache], None]] = {
        "generate() set-up, no loop": generate_set_up,
        "decoder lent and given back": lambda cache: lent(cache, False),
        "the same, one step": lambda cache: lent(cache, True),
        "bounded_generate, one token": lambda cache: bounded_generate(model, seq[:, -1:], 1, cache=cache),
        "generate(), one token": lambda cache: generate_call(model, cache, seq, 1, ahead=dispatch.launch_steps_ahead()),
    }
    return {name: 1000 * timed(part, document, seq.device, repeats) for name, part in parts.items()}


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['model']}, {result['dtype']} on {result['device']}, after {result['context']:,} tokens, "
        f"{result['tokens']} tokens, medians of {result['repeats']}",
        f"{'loop':<30}{'ms/token':>10}{'tokens/s':>10}{'vs graph loop':>15}{'fixed ms':>10}",
    ]
    for name, row in result["rows"].items():
        fixed = f"{row['fixed_ms']:>10.1f}" if "fixed_ms" in row else f"{'':>10}"
        lines.append(
            f"{name:<30}{row['ms_per_token']:>10.3f}{row['tokens_per_s']:>10.1f}{row['vs_graph_loop']:>14.3f}x{fixed}"
        )
    lines.append(f"{'a one-token call, part by part':<40}{'ms':>8}")
    lines += [f"{name:<40}{ms:>8.2f}" for name, ms in result["fixed_cost_parts"].items()]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from decode_step import load

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192, help="document tokens read before answering")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (whole chunks replay the model's graphs)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens a timed run makes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="CPU, tiny random Llama, eager graph steps: the script runs")
    p.add_argument(
        "--random-weights", action="store_true", help="SmolLM2's shape with random base weights (no model files)"
    )
    p.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="also profile N one-token calls of each answer loop (cProfile, host time by function): DIR/*.prof.txt",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.chunk, args.tokens, args.repeats = 64, 16, 2, 1
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("answer_overhead.py measures the CUDA graph loops: it needs a GPU (or --quick)")
    model, ids, name = load(
        argparse.Namespace(quick=args.quick, random_weights=args.random_weights, context=args.context + 1),
        device,
        dtype,
    )
    if args.quick:
        # the CPU has no CUDA graphs: eager graph steps in Triton's interpreter stand in for them
        from coda_gqa_l.models import generation

        pool = GraphDecoderPool(model, capture=False)
        for module in (graph_prefill, generation, sys.modules[__name__]):
            module.graph_decode_supported = lambda model: True  # type: ignore[attr-defined]
            module.shared_decoder_pool = lambda model: pool  # type: ignore[attr-defined]
    elif not graph_decode_supported(model):
        raise SystemExit("this model cannot be graph-decoded")
    document = BoundedCache(model, block_size=args.chunk)
    with torch.inference_mode():
        graph_prefill.prefill(
            model, document, ids[:, : args.context], chunk_tokens=args.chunk,
            forward=lambda piece: model(piece, **cache_kwargs(document), use_cache=True).logits[:, -1],
        )  # fmt: skip
    rows = measure(model, document, ids[:, : args.context + 1], args)
    parts = fixed_cost_parts(model, document, ids[:, : args.context + 1], max(5, args.repeats))
    if args.profile:
        profile_fixed_cost(model, document, ids[:, : args.context + 1], args)
    result = {
        **run_header("answer_overhead.py", sys.argv[1:] if argv is None else argv, device, dtype),
        "model": name,
        "context": args.context,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "rows": rows,
        "fixed_cost_parts": parts,
    }
    write_result(result, args.out / "answer_overhead.json", table(result))
    return result


if __name__ == "__main__":
    main()
