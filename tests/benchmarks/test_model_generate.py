"""Smoke test of benchmarks/model_generate.py in its --quick mode (CPU, tiny random Llama, a few seconds)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from coda_gqa_l.models import BoundedCache
from coda_gqa_l.models.hf_compat import cache_kwargs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "model_generate.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("model_generate_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench") / "generate.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), out, done.stdout


def test_quick_run_measures_every_method_at_every_context(quick_run: tuple[dict, Path, str]) -> None:
    result, out, stdout = quick_run
    assert result["complete"] and result["device"].startswith("cpu") and result["dtype"] == "float32"
    assert {"date", "command", "versions", "bounded_config", "text"} <= set(result)
    assert result["versions"]["torch"] == torch.__version__
    rows = {(r["method"], r["context"]): r for r in result["rows"]}
    methods = ("dynamic", "static-eager", "static", "static-loop", "bounded", "bounded-graph", "bounded-generate")
    assert set(rows) == {(m, c) for m in methods for c in (256, 512)}
    for context in (256, 512):  # the whole-model CUDA graphs need a GPU: said, not failed
        graph = rows.pop(("bounded-graph", context))
        assert graph["status"] == "skipped" and "CUDA" in graph["reason"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["prefill_tokens"] == row["context"] and row["new_tokens"] == result["new_tokens"] == 4
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["cache_bytes"] > 0
        assert row["peak_bytes"] is None  # CPU: no CUDA allocator to ask
        assert not row["compiled"]  # generate compiles only on accelerators
        # the memory floor: weights and cache read once per token, at the copy bandwidth measured in the run
        assert row["decode_bytes_per_token"] == row["weights_bytes"] + row["cache_bytes"]
        floor = result["copy_gb_per_s"] * 1e9 / row["decode_bytes_per_token"]
        assert row["decode_floor_tokens_per_s"] == pytest.approx(floor)
        assert row["decode_gb_per_s"] == pytest.approx(row["decode_bytes_per_token"] * row["decode_tokens_per_s"] / 1e9)
    # the bounded state's size is fixed; the full caches grow with the context
    assert rows[("bounded", 256)]["cache_bytes"] == rows[("bounded", 512)]["cache_bytes"]
    assert rows[("dynamic", 512)]["cache_bytes"] > rows[("dynamic", 256)]["cache_bytes"]
    assert rows[("bounded", 256)]["prefill_chunk"] == 128  # streamed in chunks, as the neural database ingests
    # one model, three caches and two loops: the same greedy tokens
    for context in (256, 512):
        same = [rows[(m, context)]["generated_ids"] for m in ("dynamic", "static-eager", "static", "static-loop")]
        assert same[0] == same[1] == same[2] == same[3] and len(same[0]) == 1 + 2 + 4
        # generate() with our decoding loop behind it: the bounded model's tokens
        assert rows[("bounded-generate", context)]["generated_ids"] == rows[("bounded", context)]["generated_ids"]
    lines = stdout.rstrip().splitlines()
    # the table comes last: a row per run, then why each run that is not ok is not
    assert lines[-3].split()[:3] == ["static-loop", "512", "ok"]
    assert lines[-1].startswith("bounded-graph at 512: skipped: CUDA graphs need a CUDA device")


def test_plot_and_table_from_the_json(quick_run: tuple[dict, Path, str]) -> None:
    result, out, _ = quick_run
    module = _module()
    lines = module.table_lines(result)
    not_ok = [r for r in result["rows"] if r["status"] != "ok"]
    assert lines[0].startswith("method") and len(lines) == 1 + len(result["rows"]) + len(not_ok)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert module.plot(result, out) is None
    else:
        assert out.with_suffix(".png").stat().st_size > 0


def test_prefilled_cache_continues_like_a_plain_generate() -> None:
    """Our prefill + generate(continue) gives the tokens that one plain generate() call gives."""
    module = _module()
    args = module.parse_args(["--quick"])
    bench = module.load_bench(args, torch.device("cpu"), torch.float32)
    context, total = 300, 1 + args.warmup_tokens + args.new_tokens
    prompt = bench.ids[:, :context]
    for method, model in (("dynamic", bench.original), ("bounded", bench.bounded)):
        row = module.run_one(bench, method, context, args, time.perf_counter() + 60)
        assert row["status"] == "ok", row
        cache = BoundedCache(model) if method == "bounded" else None
        with torch.no_grad():
            plain = model.generate(prompt, **cache_kwargs(cache), do_sample=False, max_new_tokens=total)
        assert row["generated_ids"] == plain[0, context:].tolist(), method


def test_a_spent_budget_skips_runs_and_says_why() -> None:
    module = _module()
    rows = [{"method": "bounded", "context": 1024, "status": "ok", "prefill_s": 10.0, "warmup_s": 1.0, "decode_s": 2.0}]
    assert module.predicted_seconds(rows, "bounded", 4096) == pytest.approx(43.0)
    assert module.predicted_seconds(rows, "dynamic", 4096) == 0.0
    assert "predicted 43 s" in module.skip_reason(rows, "bounded", 4096, time.perf_counter() + 20)
    assert module.skip_reason(rows, "bounded", 4096, time.perf_counter() + 100) is None
    assert "spent" in module.skip_reason(rows, "dynamic", 4096, time.perf_counter() - 1)
    assert module.out_path("somewhere") == Path("somewhere/model_generate.json")


def test_quick_arguments_override_only_the_defaults() -> None:
    module = _module()
    args = module.parse_args(["--quick", "--new-tokens", "3"])
    assert args.contexts == [256, 512] and args.new_tokens == 3 and args.device == "cpu"
    with pytest.raises(SystemExit):
        module.parse_args(["--contexts", "0"])
    assert isinstance(module.parse_args([]), argparse.Namespace)


def test_a_one_pass_prefill_out_of_memory_is_tried_again_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _module()
    calls = []

    def fake_run(bench, method, context, args, deadline, chunk):  # type: ignore[no-untyped-def]
        calls.append(chunk)
        status = "oom" if chunk == 0 else "ok"
        return {"method": method, "context": context, "status": status, "prefill_chunk": chunk or context}

    monkeypatch.setattr(module, "_run", fake_run)
    args = module.parse_args([])
    row = module.run_one(None, "dynamic", 131072, args, 0.0)
    assert calls == [0, module.FALLBACK_CHUNK] and row["status"] == "ok" and "chunks of 8192" in row["note"]
    calls.clear()
    assert module.run_one(None, "bounded", 131072, args, 0.0)["prefill_chunk"] == 1024 and calls == [1024]
