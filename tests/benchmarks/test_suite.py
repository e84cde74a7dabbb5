"""The layer benchmark suite on the CPU: a quick run of every section, the tables and plots, the
targets' arithmetic, and how a crashing public package is recorded (a stub wheel stands in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"

# A stand-in for the public package: "large" (128 summary slots) kills its process, "tiny" (32)
# raises from prefill, the rest runs.
STUB_PACKAGE = """
import os
import torch


class State:
    pos = 0


class CoDAGQALandmarkPerf2(torch.nn.Module):
    def __init__(self, *, embed_dim, num_heads, num_kv_heads, window, num_landmarks_exact, num_landmarks_summary):
        super().__init__()
        self.summary = num_landmarks_summary
        self.proj = torch.nn.Linear(embed_dim, embed_dim)

    def init_state(self, *, batch_size, device, dtype):
        if self.summary == 128:
            os._exit(7)
        return State()

    def prefill_chunked(self, x, state, *, block_size=256, return_outputs=True):
        if self.summary == 32:
            raise RuntimeError("stub summary kernel failed")
        state.pos += x.shape[1]
        return (self.proj(x) if return_outputs else None), state

    def step(self, x, state):
        state.pos += 1
        return self.proj(x), state

    def cache_bytes(self, *, batch_size, dtype):
        return 1234
"""


def _stub_wheel(folder: Path) -> Path:
    folder.mkdir()
    wheel = folder / "coda_gqa_l-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("coda_gqa_l/__init__.py", STUB_PACKAGE)
        archive.writestr(
            "coda_gqa_l-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: coda-gqa-l\nVersion: 9.9.9\n"
        )
    return folder


def _run(script: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    env["CODA_GQA_L_KERNELS"] = "torch"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    base = tmp_path_factory.mktemp("suite")
    wheels = _stub_wheel(base / "wheels")
    out = base / "out"
    args = ["--quick", "--device", "cpu", "--configs", "tiny,large,window", "--out", str(out)]
    done = _run("run_suite.py", *args, "--public-wheels", str(wheels))
    path = out / "suite_quick.json"
    return json.loads(path.read_text()), out, done.stdout


def _rows(results: dict, **where: object) -> list[dict]:
    return [r for r in results["rows"] if all(r.get(k) == v for k, v in where.items())]


def test_quick_suite_writes_json_tables_and_plots(quick_run) -> None:
    results, out, stdout = quick_run
    meta = results["meta"]
    assert meta["device"].startswith("CPU") and meta["torch"] and meta["date"] and "run_suite.py" in meta["command"]
    for name in ("suite_quick.json", "suite_quick.md", "suite_quick_prefill.png", "suite_quick_decode.png"):
        assert (out / name).stat().st_size > 0
    assert "### Targets" in stdout and stdout.rstrip().splitlines()[-1].startswith("wrote ")
    sections = {r["section"] for r in results["rows"]}
    assert {"prefill", "routing", "decode", "kernel", "train", "public"} <= sections
    ours = [r for r in results["rows"] if not str(r.get("method", "")).startswith("public-")]
    assert all(r["status"] == "ok" for r in ours if r["section"] != "kernel"), [r for r in ours if r["status"] != "ok"]
    assert results["targets"] and {t["status"] for t in results["targets"]} <= {"pass", "miss", "info", "not measured"}


def test_cuda_only_parts_are_skipped_with_a_reason(quick_run) -> None:
    results, _, _ = quick_run
    assert results["ceilings"]["status"] == "skipped" and results["ceilings"]["reason"]
    static = _rows(results, section="decode", method="gqa-static-graph")
    assert static and all(r["how"] == "eager (CUDA graphs need a GPU)" for r in static)
    assert all(r["peak_bytes"] is None for r in static)
    bounded = _rows(results, section="decode", method="bounded-tiny")
    assert bounded[0]["state_bytes"] < bounded[-1]["full_cache_bytes"]


def test_public_package_crashes_are_recorded(quick_run) -> None:
    results, _, _ = quick_run
    died = _rows(results, section="public", method="public-9.9.9-large")
    assert len(died) == 1 and died[0]["status"] == "error" and "code 7" in died[0]["error"]
    raised = _rows(results, section="prefill", method="public-9.9.9-tiny")
    assert raised and all(r["status"] == "error" and "stub summary kernel failed" in r["error"] for r in raised)
    worked = _rows(results, method="public-9.9.9-window")
    assert {r["section"] for r in worked} == {"prefill", "decode"} and all(r["status"] == "ok" for r in worked)
    assert worked[-1]["state_bytes"] == 1234


def test_targets_use_the_fastest_baseline() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from suite_targets import evaluate

    def row(method: str, tokens_per_s: float, **where: object) -> dict:
        return {
            "section": "prefill",
            "shape": "7B",
            "method": method,
            "status": "ok",
            "tokens_per_s": tokens_per_s,
        } | where

    rows = [
        row("gqa-bare", 100.0, length=2048),
        row("gqa-baseline", 95.0, length=2048),
        row("bounded-medium", 92.0, length=2048),
        row("gqa-bare", 10.0, length=32768),
        row("gqa-baseline", 12.0, length=32768),
        row("bounded-medium", 30.0, length=32768),
    ]
    targets = {t["name"]: t for t in evaluate(rows, "7B", "medium", [2048, 32768], [])}
    short = targets["prefill: bounded-medium / fastest GQA at length 2,048 (7B)"]
    assert short["against"] == "gqa-bare" and short["value"] == pytest.approx(0.92) and short["status"] == "pass"
    long = targets["prefill: bounded-medium / fastest GQA at length 32,768 (7B)"]
    assert long["against"] == "gqa-baseline" and long["value"] == pytest.approx(2.5) and long["status"] == "miss"
    fair = targets["fair baseline: BaselineGQA / bare GQA prefill, L 2,048 (7B)"]
    assert fair["value"] == pytest.approx(0.95) and fair["status"] == "pass"
    assert targets["train: CoDA / fastest GQA step time, L None (7B)"]["status"] == "not measured"


def test_the_static_cache_decode_is_checked_against_the_flash_step() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from suite_targets import evaluate

    def row(method: str, tokens_per_s: float, context: int) -> dict:
        return {"section": "decode", "shape": "7B", "method": method, "status": "ok", "tokens_per_s": tokens_per_s,
                "context": context}  # fmt: skip

    rows = [row("gqa-flash-fixed", 100.0, 2048), row("gqa-static-graph", 95.0, 2048),
            row("gqa-flash-fixed", 100.0, 131072), row("gqa-static-graph", 10.0, 131072)]  # fmt: skip
    targets = {t["name"]: t for t in evaluate(rows, "7B", "medium", [], [2048, 131072])}
    short = targets["fair baseline: static-cache GQA / fixed-length flash decode, C 2,048 (7B)"]
    assert short["value"] == pytest.approx(0.95) and short["status"] == "pass"
    long = targets["fair baseline: static-cache GQA / fixed-length flash decode, C 131,072 (7B)"]
    assert long["value"] == pytest.approx(0.1) and long["status"] == "miss"


def test_each_decode_context_of_the_issue_keeps_its_own_goal_in_a_run_of_one_context() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from suite_targets import evaluate

    def goal(context: int) -> float:
        rows = [{"section": "decode", "shape": "7B", "method": m, "status": "ok", "tokens_per_s": 10.0,
                 "context": context} for m in ("gqa-flash-fused", "bounded-medium")]  # fmt: skip
        name = f"decode: bounded-medium / fastest GQA at context {context:,} (7B)"
        found = {t["name"]: t for t in evaluate(rows, "7B", "medium", [], [context])}[name]
        assert found["against"] == "gqa-flash-fused"  # the fused flash step is a GQA baseline
        return float(found["goal"])

    assert goal(2048) == 1.2 and goal(131072) == 3.5 and goal(64) == 1.2


def test_public_child_never_sees_our_package(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from public_package import child_environment

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), "/elsewhere"]))
    env = child_environment(tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/elsewhere"]


def test_splice_replaces_between_markers(tmp_path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from render_tables import BEGIN, END, splice

    target = tmp_path / "RESULTS.md"
    target.write_text("# Results\n\nintro\n")
    splice(target, "first")
    splice(target, "second")
    text = target.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second" in text and "first" not in text and text.startswith("# Results\n\nintro\n")


def test_routing_target_takes_the_largest_estimate() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from suite_targets import _routing_target

    row = {"section": "routing", "shape": "7B", "method": "bounded-medium", "length": 32768, "status": "ok"}
    unknown_profiler = row | {"profiler_share": None, "named_kernel_share": 0.398, "sync_hook_share": 0.33}
    target = _routing_target([unknown_profiler], "7B", "medium")
    assert (target["value"], target["against"], target["status"]) == (0.398, "named_kernel_share", "miss")
    assert _routing_target([row | {"sync_hook_share": 0.1}], "7B", "medium")["status"] == "pass"
    assert _routing_target([row], "7B", "medium")["status"] == "not measured"


@pytest.mark.slow
def test_needle_trace_finds_the_key_in_the_shipped_banks(tmp_path: Path) -> None:
    """benchmarks/needle_trace.py on the shipped weights: the key's tokens are still in the exact
    bank of most layers at the question, and few other tokens pass the write gate (the gates of the
    first shipped weights let almost every token in and held no key pair in any layer)."""
    out = tmp_path / "trace.json"
    settings = ["--length", "1536", "--depth", "0.1", "--trials", "1", "--out", str(out)]
    done = _run("needle_trace.py", *settings, timeout=400)
    assert "| layer |" in done.stdout
    (trial,) = json.loads(out.read_text())["trials"]
    layers = trial["layers"]
    assert len(layers) == 30 and trial["question_at"] - trial["key_tokens"][-1] >= 512
    assert sum(r["key_pairs_held"] > 0 for r in layers) >= 20
    assert sorted(r["other_above_tau"] for r in layers)[15] < 0.05  # the median layer refuses 95% of tokens


@pytest.mark.slow
def test_needle_trace_locates_each_fact_of_the_demo_document(tmp_path: Path) -> None:
    """needle_trace --sample: every demo question is answered from the state and scored; an answered
    fact is held in the exact bank of most layers, and a missed one gets a verdict that agrees with
    its fates (a "gate" miss wrote nothing, a "read-out" miss is still held)."""
    sys.path.insert(0, str(BENCHMARKS))
    from needle_trace import verdict

    out = tmp_path / "trace.json"
    done = _run("needle_trace.py", "--sample", "harbour", "--out", str(out), timeout=400)
    assert "| value | kind |" in done.stdout
    (trial,) = json.loads(out.read_text())["trials"]
    facts = trial["facts"]
    assert [f["value"] for f in facts] == ["Tobias Wren", "7.245", "Pepper", "blue shed", "1987"]
    assert sum(f["correct"] for f in facts) >= 3
    for f in facts:
        assert f["verdict"] == verdict(f, f["correct"]) and f["tokens"] and f["distance"] >= 512
        if f["correct"]:
            assert f["layers_holding"] >= 20 and f["gate_mean"] > trial["tau_exact"]


def test_needle_trace_gates_after_a_value_first_value() -> None:
    """The gates of a value-first statement's tokens after its value, from layer 6 on, beside its value's and the
    other tokens': what ``coda-train --value-first-keep after`` would teach the gate to keep."""
    sys.path.insert(0, str(BENCHMARKS))
    from needle_trace import EARLY_LAYERS, _after_value_gates

    rows = [{"needle_gate_means": [0.9, 0.1], "other_gate_mean": 0.5, "watch_gates": [None, (0.9, 1.0)]}] * EARLY_LAYERS
    rows += [{"needle_gate_means": [0.2, 0.4], "other_gate_mean": 0.01, "watch_gates": [None, (0.3, 0.25)]}] * 24
    assert _after_value_gates(rows, 0) == {}  # not a value-first fact: nothing watched
    late = _after_value_gates(rows, 1)
    assert late == pytest.approx(
        {"late_value_gate": 0.4, "late_after_gate": 0.3, "late_after_above_tau": 0.25, "late_other_gate": 0.01}
    )


@pytest.mark.parametrize("fold", [False, True])
def test_needle_trace_forces_the_gates_of_the_chosen_tokens(fold: bool) -> None:
    """--force-gates' oracle: the chosen document tokens' write-gate logits are FORCED_LOGIT in every layer and KV
    head, counted across chunks, whether the gate is its own product or the last columns of a folded one; the
    other tokens' logits are untouched, and the hooks go when the block ends."""
    sys.path.insert(0, str(BENCHMARKS))
    import torch
    from helpers import tiny_bounded_llama
    from needle_trace import FORCED_LOGIT, forced_gates

    from coda_gqa_l.models.inference import fold_for_inference
    from coda_gqa_l.training.gate_supervision import recorded_gate_logits

    model = tiny_bounded_llama(0)
    if fold:
        fold_for_inference(model)
    ids = torch.randint(0, 200, (1, 40))

    def logits() -> torch.Tensor:  # (layers, 40, Hkv), read in chunks of 16, 16 and 8
        with torch.no_grad(), recorded_gate_logits(model) as got:
            for start in range(0, 40, 16):
                model(ids[:, start : start + 16])
        return torch.stack([torch.cat(got[i::2], 1)[0] for i in range(2)])

    plain = logits()
    with forced_gates(model, [3, 17, 33, 33]):
        forced = logits()
    chosen = torch.zeros(40, dtype=torch.bool)
    chosen[[3, 17, 33]] = True
    assert (forced[:, chosen] == FORCED_LOGIT).all()
    torch.testing.assert_close(forced[:, ~chosen], plain[:, ~chosen])
    torch.testing.assert_close(logits(), plain)


def test_needle_trace_verdicts() -> None:
    """Where a missed needle was lost, from its fates: refused by the gate, evicted, or held and not read."""
    sys.path.insert(0, str(BENCHMARKS))
    from needle_trace import verdict

    fates = dict.fromkeys(("below_tau", "hit_own_key", "hit_other", "similar_to_bank", "duplicate_in_segment",
                           "cut_by_max_inserts", "written"), 0)  # fmt: skip
    assert verdict({"pairs_held": 0, "fates": fates | {"below_tau": 9}}, False) == "gate"
    assert verdict({"pairs_held": 0, "fates": fates | {"written": 3}}, False) == "evicted"
    assert verdict({"pairs_held": 2, "fates": fates | {"written": 3}}, False) == "read-out"
    held_by_few = {"pairs_held": 2, "layers_holding": 1, "layers": 30}  # 29 layers' gates refused it
    assert verdict(held_by_few | {"fates": fates | {"written": 2, "below_tau": 300}}, False) == "gate"
    assert verdict(held_by_few | {"layers_holding": 15, "fates": fates | {"below_tau": 300}}, False) == "read-out"
    assert verdict({"pairs_held": 0, "fates": fates | {"similar_to_bank": 4, "below_tau": 1}}, False) == "novelty test"
    # held nowhere, six candidacies written and evicted, 354 under the gate threshold: the gate lost it
    assert verdict({"pairs_held": 0, "fates": fates | {"written": 6, "below_tau": 354}}, False) == "gate"


def _eval_json(path: Path, device: str, perplexity: list[tuple], passkey: list[tuple], routing: tuple = ()) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "coda-eval", "date": "2026-11-23 10:00 UTC", "device": device, "dtype": "bfloat16",
            "torch": "2.11", "weights": None, "gqa_weights": None, "config": "medium", "num_sink": 4,
            "routing": list(routing)}  # fmt: skip
    rows = [{"method": m, "text": "wikipedia", "length": n, "scored_tokens": t, "ppl": p} for m, n, t, p in perplexity]
    keys = [{"method": m, "keys": 1, "length": n, "depth": d, "status": "ok", "correct": c, "trials": 50,
             "accuracy": c / 50, "ci95": [0.0, 1.0]} for m, n, d, c in passkey]  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "perplexity": rows, "passkey": keys}))
    return str(path)


def test_merge_evals_keeps_one_token_set_and_refuses_a_cell_measured_twice(tmp_path: Path) -> None:
    full = _eval_json(tmp_path / "a/eval.json", "H100", [("coda-bounded", 2048, 16376, 17.0),
                      ("coda-bounded", 4096, 16376, 16.8)], [("coda-bounded", 4096, 0.5, 36)])  # fmt: skip
    # a quick run given one length scores its first window only: left out, not mixed in
    quick = _eval_json(tmp_path / "b/eval.json", "H100", [("gqa-bounded", 2048, 2047, 13.3)],
                       [("gqa-bounded", 4096, 0.5, 35), ("coda-bounded", 4096, 0.5, 30)])  # fmt: skip
    out = tmp_path / "merged"
    run = _run("merge_evals.py", "--out", str(out), full, quick + ":gqa-bounded")
    assert run.returncode == 0, run.stderr
    merged = json.loads((out / "eval.json").read_text())
    assert [(r["method"], r["length"]) for r in merged["perplexity"]] == [
        ("coda-bounded", 2048),
        ("coda-bounded", 4096),
    ]
    assert merged["meta"]["perplexity_rows_left_out"] == 1
    grid = (out / "passkey_grid.md").read_text()
    assert "| coda-bounded | 1 | 36/50 (72%) |" in grid and "| gqa-bounded | 1 | 35/50 (70%) |" in grid

    twice = _run("merge_evals.py", "--out", str(out), full, quick, check=False)
    assert twice.returncode != 0 and "measured twice" in twice.stderr
    other = _eval_json(tmp_path / "c/eval.json", "H200", [], [])
    mixed = _run("merge_evals.py", "--out", str(out), full, other, check=False)
    assert mixed.returncode != 0 and "different devices" in mixed.stderr
    retuned = _eval_json(tmp_path / "d/eval.json", "H100", [], [("gqa-bounded", 8192, 0.5, 30)], ("novelty=0.85",))
    mixed = _run("merge_evals.py", "--out", str(out), full, retuned, check=False)
    assert mixed.returncode != 0 and "different routing" in mixed.stderr
    # a method without banks may come from a run with any routing
    assert (
        _run("merge_evals.py", "--out", str(out), full + ":coda-bounded:passkey", retuned + ":window").returncode == 0
    )
    passkey_only = _run("merge_evals.py", "--out", str(out), full + ":coda-bounded:passkey")
    assert json.loads((out / "eval.json").read_text())["perplexity"] == [] and passkey_only.returncode == 0
