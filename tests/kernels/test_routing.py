"""The fused bank routing kernel against its PyTorch reference (docs/kernels.md;
invariant 7 of docs/semantics.md section 5).

A token stream is cut into chunks (mid-segment starts, several boundaries per chunk, boundaries
whose evicted tokens are all sinks or before the stream) and each chunk is routed twice, by
``routing_reference.route_chunk`` and by ``kernels.routing.route_chunk_triton``, each carrying its own banks.
Decisions (fill flags, last use, which token went where) must be identical and values close.
The inputs are random draws (values around a small vocabulary of directions, uniform gates); the
first seed whose reference run makes every routing event happen (hits, duplicates, inserts cut
by ``max_inserts``, LRU overwrites, seeds, EMA updates) with every routing score at least 1e-4
from the boundary it decides is searched once per case, as the layer tests do.

Without a GPU the kernel runs in Triton's interpreter (set below before anything imports triton,
as conftest does); with one, the same tests run compiled and the ``gpu`` tests add bfloat16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton: torch itself does not
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import cache  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from coda_gqa_l.config import BoundedConfig  # noqa: E402
from coda_gqa_l.kernels import dispatch  # noqa: E402
from coda_gqa_l.kernels import routing_reference as banks_module  # noqa: E402
from coda_gqa_l.kernels.dispatch import interpreting  # noqa: E402
from coda_gqa_l.kernels.routing import route_chunk_triton  # noqa: E402
from coda_gqa_l.kernels.routing_reference import Banks, bank_view, chunk_segments, route_chunk  # noqa: E402
from coda_gqa_l.state import BANK_FIELDS, BoundedState  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT_FIELDS = ("ex_last", "ex_filled", "sm_filled")
MARGIN = 1e-4


@dataclass(frozen=True)
class Case:
    """A routing problem: bank config, head shape and the chunk sizes the stream is cut into."""

    config: dict[str, Any]
    head_dim: int
    batch: int = 1
    kv_heads: int = 2
    chunks: tuple[int, ...] = (5, 20, 3, 8, 13, 1, 1, 30, 7, 17, 9)
    vocab: int = 10  # directions the values are drawn around: more than Me, so the bank overflows


CASES = {
    # exact and summary banks, head size 16
    "both": Case(dict(window=32, segment=8, num_landmarks_exact=6, num_landmarks_summary=5, max_inserts=3), 16),
    # head size 12 (padded to 16), Me = 5, no summary bank
    "exact-only-dh12": Case(
        dict(window=32, segment=8, num_landmarks_exact=5, num_landmarks_summary=0, max_inserts=2), 12
    ),
    # Ms = 6, no exact bank, head size 48 (not a power of two), some tokens gated out of the summary
    "summary-only-dh48": Case(
        dict(window=32, segment=8, num_landmarks_exact=0, num_landmarks_summary=6, tau_summary=0.2),
        48,
        batch=2,
        kv_heads=1,
    ),
    # sinks inside the first evicted segment, all but its last token: the least a segment can route
    "sinks": Case(
        dict(window=32, segment=8, num_landmarks_exact=6, num_landmarks_summary=4, num_sink=7, max_inserts=2), 16
    ),
    # more sinks than a segment: the boundary at token W evicts only sinks (routes nothing)
    "sinks-fill-a-segment": Case(
        dict(window=32, segment=8, num_landmarks_exact=5, num_landmarks_summary=3, num_sink=10, max_inserts=2), 16
    ),
    # the shipped weights' thresholds (novelty 0.9, match 0.97) with more inserts a segment than the others
    "shipped-thresholds": Case(
        dict(
            window=64,
            segment=16,
            num_landmarks_exact=10,
            num_landmarks_summary=4,
            novelty=0.9,
            match=0.97,
            max_inserts=6,
        ),  # fmt: skip
        16,
        vocab=14,
    ),
    # head size 64, slot counts above one 16-wide tile and not powers of two, S = 16
    "dh64-wide-banks": Case(
        dict(window=64, segment=16, num_landmarks_exact=18, num_landmarks_summary=17, max_inserts=4),
        64,
        kv_heads=1,
        chunks=(40, 16, 9, 7, 33, 16, 50, 21),
        vocab=40,
    ),
}


class Stream:
    """Token-like keys, values and gates of ``(B, Hkv)`` heads: values drawn from a small vocabulary
    of directions plus noise, so that bank hits, near-duplicates and novel tokens all occur."""

    def __init__(self, case: Case, length: int, seed: int, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(seed)
        B, H, D = case.batch, case.kv_heads, case.head_dim
        vocab = torch.randn(case.vocab, D, generator=gen)
        words = torch.randint(0, case.vocab, (B, H, length), generator=gen)
        scale = 0.5 + torch.rand(B, H, length, 1, generator=gen)
        self.v = (vocab[words] + 0.15 * torch.randn(B, H, length, D, generator=gen)) * scale
        self.k = torch.randn(B, H, length, D, generator=gen)
        self.g = torch.rand(B, H, length, generator=gen)
        self.eta = 0.1 + 0.5 * torch.rand(H, generator=gen)
        self.dtype = dtype

    def ext(self, start: int, n: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``start - W .. start + n - 1`` as ``_advance`` lines them up (zeros before the stream)."""
        lead = max(0, window - start)

        def take(x: torch.Tensor) -> torch.Tensor:
            part = x[:, :, max(0, start - window) : start + n]
            pad = torch.zeros(*part.shape[:2], lead, *part.shape[3:], dtype=part.dtype)
            return torch.cat([pad, part], dim=2).to(DEVICE)

        return take(self.k).to(self.dtype), take(self.v).to(self.dtype), take(self.g)


def empty_banks(case: Case, dtype: torch.dtype) -> Banks:
    cfg = BoundedConfig(**case.config)
    state = BoundedState.empty(cfg, case.batch, case.kv_heads, case.head_dim, DEVICE, dtype)
    return Banks(*(getattr(state, name) for name in BANK_FIELDS))


@contextmanager
def count_events() -> Iterator[dict[str, float]]:
    """Per-boundary facts the summed metrics hide: duplicates, and inserts capped by ``max_inserts``."""
    seen = {"duplicates": 0.0, "capped_inserts": 0.0}
    original = banks_module.route_segment

    def wrapped(banks: Banks, k, v, g, token_index, valid, eta, config, metrics=None, **kw):  # type: ignore[no-untyped-def]
        new = original(banks, k, v, g, token_index, valid, eta, config, metrics, **kw)
        if banks.ex_k.shape[2]:
            written = (new.ex_k != banks.ex_k).any(-1) | (new.ex_filled & ~banks.ex_filled)
            seen["capped_inserts"] += float((written.sum(-1) == config.max_inserts).sum())
            vn = torch.nn.functional.normalize(v.float(), dim=-1)
            cand = valid & (g > config.tau_exact)
            higher = banks_module._pairwise_higher(g, cand)
            seen["duplicates"] += float((cand & (higher & (vn @ vn.transpose(-1, -2) >= config.novelty)).any(-1)).sum())
        return new

    banks_module.route_segment = wrapped
    try:
        yield seen
    finally:
        banks_module.route_segment = original


def run_reference(case: Case, seed: int, dtype: torch.dtype) -> tuple[list[Any], dict[str, float], dict[str, float]]:
    """The reference over the whole stream: per chunk (start, n, inputs, banks before, results)."""
    cfg = BoundedConfig(**case.config)
    length = sum(case.chunks)
    stream = Stream(case, length, seed, dtype)
    banks = empty_banks(case, dtype)
    metrics: dict[str, float] = {}
    steps = []
    start = 0
    with torch.no_grad(), count_events() as seen:
        for n in case.chunks:
            ext = stream.ext(start, n, cfg.window)
            eta = stream.eta.to(DEVICE)
            result = route_chunk(banks, *ext, start=start, n=n, eta=eta, config=cfg, metrics=metrics)
            steps.append((start, n, ext, eta, banks, result))
            banks = result[0]
            start += n
    return steps, metrics, seen


def missing_events(case: Case, metrics: dict[str, float], seen: dict[str, float]) -> list[str]:
    wanted = ["evicted"]
    if case.config["num_landmarks_exact"]:
        wanted += ["exact_hits", "exact_inserts", "exact_overwrites"]
    if case.config["num_landmarks_summary"]:
        wanted += ["summary_seeds", "summary_updates"]
    if case.config.get("tau_summary", 0.0) > 0:
        wanted += ["gated_out"]
    found = dict(metrics)
    if case.config["num_landmarks_exact"]:
        wanted += ["duplicates", "capped_inserts"]
        found.update(seen)
    return [name for name in wanted if found.get(name, 0) <= 0]


@cache
def safe_seed(name: str, dtype: torch.dtype = torch.float32, margin: float = MARGIN) -> int:
    """A stream seed whose reference run makes every event happen with every score >= margin from its boundary."""
    case = CASES[name]
    for seed in range(200):
        _, metrics, seen = run_reference(case, seed, dtype)
        if metrics.get("min_margin", 0.0) >= margin and not missing_events(case, metrics, seen):
            return seed
    raise AssertionError(f"no margin-safe seed with every routing event for case {name}")


def assert_same_routing(ref: tuple[Any, ...], out: tuple[Any, ...], atol: float, rtol: float = 0.0) -> None:
    ref_banks, *ref_snap = ref
    out_banks, *out_snap = out
    for field in EXACT_FIELDS:
        a, b = getattr(ref_banks, field), getattr(out_banks, field)
        assert torch.equal(a, b), f"{field} differs: a routing decision diverged"
    for field in ("ex_k", "ex_v", "ex_g", "sm_k", "sm_v", "sm_g"):
        a, b = getattr(ref_banks, field), getattr(out_banks, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=rtol, msg=lambda m, f=field: f"{f}: {m}")
    for name, a, b in zip(("bank_k", "bank_v", "bank_bias"), ref_snap, out_snap, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: filled slots differ"
        torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=rtol, msg=lambda m, f=name: f"{f}: {m}")


def compare_stream(name: str, dtype: torch.dtype, atol: float, rtol: float = 0.0) -> None:
    """Route every chunk of the stream with both and compare.

    In float32 each carries its own banks through the whole stream. In 16-bit floats every
    update is rounded to the storage type, where float32 rounding differences flip a last bit
    now and then and the EMA keeps it; so each chunk starts from the reference's banks there.
    """
    case = CASES[name]
    cfg = BoundedConfig(**case.config)
    steps, _, _ = run_reference(case, safe_seed(name, dtype), dtype)
    W, S, Ns = cfg.window, cfg.segment, cfg.num_sink
    boundaries = [(start, b) for start, n, *_ in steps for b in chunk_segments(start, n, S) if b >= start]
    assert any(start % S for start, *_ in steps), "no chunk starts inside a segment"
    assert any(len(chunk_segments(start, n, S)) > 2 for start, n, *_ in steps), "no chunk crosses two boundaries"
    assert any(b - W + S <= Ns for _, b in boundaries), "no boundary whose evicted tokens are all unroutable"
    banks = steps[0][4]
    with torch.no_grad():
        for i, (start, n, ext, eta, _, ref) in enumerate(steps):
            start_dev = torch.tensor(start, device=DEVICE) if i % 2 else None
            out = route_chunk_triton(banks, *ext, start=start, n=n, eta=eta, config=cfg, start_dev=start_dev)
            assert out[1].shape[2] == len(chunk_segments(start, n, cfg.segment))
            assert_same_routing(ref, out, atol, rtol)
            banks = out[0] if dtype == torch.float32 else ref[0]


def test_interpreter_really_runs_on_cpu() -> None:
    from coda_gqa_l.kernels import routing_triton

    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1" and interpreting()
        assert type(routing_triton._route_chunk_kernel).__name__ == "InterpretedFunction"
    else:
        assert type(routing_triton._route_chunk_kernel).__name__ == "JITFunction"


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str) -> None:
    compare_stream(name, torch.float32, atol=1e-5)


def test_bfloat16_banks_in_the_interpreter() -> None:
    """bf16 storage: values rounded to bf16 after each update, like the reference (float32 dots here)."""
    compare_stream("both", torch.bfloat16, atol=1e-6, rtol=2**-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference_on_gpu(name: str, dtype: torch.dtype) -> None:
    assert DEVICE == "cuda"
    compare_stream(
        name, dtype, atol=1e-5 if dtype == torch.float32 else 1e-6, rtol=0.0 if dtype == torch.float32 else 2**-6
    )


def compare_key_followers(name: str, dtype: torch.dtype) -> None:
    """The same stream routed with the key rows written by follower programs and inside the chains: every bank and
    snapshot bit for bit, chunk after chunk (both from the same banks), in place as well."""
    case = CASES[name]
    cfg = BoundedConfig(**case.config)
    steps, _, _ = run_reference(case, safe_seed(name, dtype), dtype)
    banks = steps[0][4]
    with torch.no_grad():
        for start, n, ext, eta, _, _ in steps:
            with dispatch.key_followers(False):
                expected = route_chunk_triton(banks, *ext, start=start, n=n, eta=eta, config=cfg)
            with dispatch.key_followers(True):
                followed = route_chunk_triton(banks, *ext, start=start, n=n, eta=eta, config=cfg)
                in_place = type(banks)(*(t.clone() for t in banks))
                route_chunk_triton(in_place, *ext, start=start, n=n, eta=eta, config=cfg, out=in_place)
            for field, a, b, c in zip(Banks._fields, expected[0], followed[0], in_place, strict=True):
                assert torch.equal(a, b) and torch.equal(a, c), f"{field} differs"
            for index, (a, b) in enumerate(zip(expected[1:], followed[1:], strict=True)):
                assert torch.equal(a, b), f"snapshot {('keys', 'values', 'biases')[index]} differs"
            banks = expected[0]


@pytest.mark.parametrize("name", ["both", "sinks", "summary-only-dh48", "exact-only-dh12"])
def test_key_followers_write_the_keys_the_chains_wrote(name: str) -> None:
    compare_key_followers(name, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_key_followers_write_the_keys_the_chains_wrote_on_gpu(name: str, dtype: torch.dtype) -> None:
    assert DEVICE == "cuda"
    compare_key_followers(name, dtype)


def test_decode_steps_read_the_position_on_the_device() -> None:
    """Token by token (the CUDA-graph decode step): the host ``start`` stays 0 and the position comes
    from ``start_dev``; routing happens exactly at segment boundaries and matches the reference."""
    name = "sinks"
    case = CASES[name]
    cfg = BoundedConfig(**case.config)
    seed = safe_seed(name)
    steps, _, _ = run_reference(case, seed, torch.float32)
    stream = Stream(case, sum(case.chunks), seed, torch.float32)
    # a chunk past the first evictions that crosses at least two boundaries
    first, n, _, eta, banks, _ = next(s for s in steps if s[0] >= cfg.window + cfg.segment and s[1] >= 2 * cfg.segment)
    with torch.no_grad():
        for start in range(first, first + n):
            ext = stream.ext(start, 1, cfg.window)
            ref = route_chunk(banks, *ext, start=start, n=1, eta=eta, config=cfg)
            pos = torch.tensor(start, device=DEVICE)
            out = route_chunk_triton(banks, *ext, start=0, n=1, eta=eta, config=cfg, start_dev=pos)
            assert_same_routing(ref, out, atol=1e-5)
            changed = not all(torch.equal(a, b) for a, b in zip(banks, out[0], strict=True))
            assert changed == (start % cfg.segment == 0)
            banks = out[0]


@pytest.mark.parametrize("name", ["both", "sinks"])
def test_routing_in_place_gives_what_routing_into_new_tensors_gives(name: str) -> None:
    """``out=banks`` (a graph step routes the state's banks in place): the same banks and snapshots, bit for bit,
    chunk after chunk; a bad ``out`` is refused."""
    case = CASES[name]
    cfg = BoundedConfig(**case.config)
    steps, _, _ = run_reference(case, safe_seed(name), torch.float32)
    fresh = steps[0][4]
    in_place = type(fresh)(*(t.clone() for t in fresh))
    with torch.no_grad():
        for start, n, ext, eta, _, _ in steps:
            expected = route_chunk_triton(fresh, *ext, start=start, n=n, eta=eta, config=cfg)
            got = route_chunk_triton(in_place, *ext, start=start, n=n, eta=eta, config=cfg, out=in_place)
            assert all(a is b for a, b in zip(got[0], in_place, strict=True))  # written into the given tensors
            for a, b in zip((*expected[0], *expected[1:]), (*got[0], *got[1:]), strict=True):
                assert torch.equal(a, b)
            fresh = expected[0]
        bad = type(fresh)(*(t.clone() for t in fresh))._replace(
            ex_k=fresh.ex_k.transpose(2, 3).contiguous().transpose(2, 3)
        )
        with pytest.raises(ValueError, match="contiguous"):
            route_chunk_triton(fresh, *ext, start=start, n=n, eta=eta, config=cfg, out=bad)


def test_refuses_autograd_and_bad_shapes() -> None:
    case = CASES["both"]
    cfg = BoundedConfig(**case.config)
    stream = Stream(case, 64, 0, torch.float32)
    k, v, g = stream.ext(40, 8, cfg.window)
    banks = empty_banks(case, torch.float32)
    eta = stream.eta.to(DEVICE)
    with pytest.raises(RuntimeError, match="inference only"):
        route_chunk_triton(banks, k, v.requires_grad_(), g, start=40, n=8, eta=eta, config=cfg)
    with pytest.raises(ValueError, match="W \\+ n"):
        route_chunk_triton(banks, k, v.detach(), g, start=40, n=9, eta=eta, config=cfg)


def test_empty_chunk_and_bank_view() -> None:
    case = CASES["both"]
    cfg = BoundedConfig(**case.config)
    stream = Stream(case, 64, 0, torch.float32)
    banks = empty_banks(case, torch.float32)
    ext = stream.ext(40, 0, cfg.window)
    eta = stream.eta.to(DEVICE)
    for fn in (route_chunk, route_chunk_triton):
        out_banks, bank_k, _, bank_bias = fn(banks, *ext, start=40, n=0, eta=eta, config=cfg)
        assert bank_k.shape[2] == 0 and bank_bias.shape[2] == 0
        assert all(torch.equal(a, b) for a, b in zip(out_banks, banks, strict=True))
    k, v, bias = bank_view(banks)
    assert k.shape[2] == cfg.num_landmarks_exact + cfg.num_landmarks_summary
    assert torch.isinf(bias).all()


def test_the_cpu_skip_of_segments_without_exact_candidates_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a segment whose evicted tokens all sit below ``tau_exact`` skips the exact bank's routing (a trained
    gate keeps under 1% of tokens). The banks and snapshots are the same, to the bit, as when it is routed (metrics
    on turn the skip off), over a stream where both kinds of segment occur."""
    case = Case(dict(window=32, segment=8, num_landmarks_exact=6, num_landmarks_summary=5, tau_exact=0.9), 16)
    cfg = BoundedConfig(**case.config)
    stream = Stream(case, sum(case.chunks), seed=3, dtype=torch.float32)
    routed = {"skipped": 0, "routed": 0}
    original = banks_module._route_exact

    def counting(*args: Any) -> Banks:
        routed["routed"] += 1
        return original(*args)

    monkeypatch.setattr(banks_module, "_route_exact", counting)
    fast, full = empty_banks(case, torch.float32), empty_banks(case, torch.float32)
    start = 0
    with torch.no_grad():
        for n in case.chunks:
            ext = stream.ext(start, n, cfg.window)
            before = routed["routed"]
            fast_out = route_chunk(fast, *ext, start=start, n=n, eta=stream.eta, config=cfg)
            fast_calls = routed["routed"] - before
            full_out = route_chunk(full, *ext, start=start, n=n, eta=stream.eta, config=cfg, metrics={})
            routed["skipped"] += routed["routed"] - before - 2 * fast_calls
            for a, b in zip((*fast_out[0], *fast_out[1:]), (*full_out[0], *full_out[1:]), strict=True):
                assert torch.equal(a, b)
            fast, full = fast_out[0], full_out[0]
            start += n
    assert DEVICE == "cpu" or routed["skipped"] == 0  # the skip is a CPU path
    if DEVICE == "cpu":
        assert routed["skipped"] > 0 and routed["routed"] > 2 * routed["skipped"]  # both kinds of segment


def test_phase_stamps_change_nothing_and_cover_every_phase() -> None:
    """``route_chunk_triton(phase_stamps=...)`` (benchmarks/routing_phases.py) routes exactly as without it; on a GPU
    every program writes a rising cycle count for each of its phases, in the interpreter zeros; a buffer of the
    wrong shape is refused."""
    from coda_gqa_l.kernels.routing import phase_stamp_buffer

    case = CASES["both"]
    cfg = BoundedConfig(**case.config)
    stream = Stream(case, 120, 0, torch.float32)
    banks = empty_banks(case, torch.float32)
    start, n = 40, 50
    ext, eta = stream.ext(start, n, cfg.window), stream.eta.to(DEVICE)
    nseg = len(chunk_segments(start, n, cfg.segment))
    stamps = phase_stamp_buffer(case.batch * case.kv_heads, nseg, device=DEVICE)
    with torch.no_grad(), dispatch.key_followers(True):
        plain = route_chunk_triton(banks, *ext, start=start, n=n, eta=eta, config=cfg)
        stamped = route_chunk_triton(banks, *ext, start=start, n=n, eta=eta, config=cfg, phase_stamps=stamps)
        with pytest.raises(ValueError, match="phase_stamps"):
            route_chunk_triton(banks, *ext, start=start, n=n, eta=eta, config=cfg, phase_stamps=stamps[:, :2])
    assert_same_routing(plain, stamped, atol=0.0)
    if interpreting():
        assert not stamps.any()
    else:  # exact chain phases 0-4, summary chain 0-5, each follower 0-2: rising within a segment
        for program, phases in enumerate((5, 6, 3, 3)):
            taken = stamps[:, program, :, :phases]
            assert bool((taken > 0).all()) and bool((taken.diff(dim=-1) >= 0).all()), program
