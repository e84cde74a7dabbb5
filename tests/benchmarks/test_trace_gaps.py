"""benchmarks/trace_gaps.py on a small hand-made Chrome trace: the kernels in start order and the span cut by what
runs (nothing, routing alone, routing beside others, others without routing); an unreadable trace is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_gaps.py"), *args], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_the_span_is_cut_by_what_runs(tmp_path: Path) -> None:
    events = [  # us: a product 0-20, routing 10-60, idle 60-70, the attention 70-80, a host op that is not a kernel
        {"ph": "X", "cat": "kernel", "name": "_route_chunk_kernel", "ts": 110, "dur": 50, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_gemm", "ts": 100, "dur": 20, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "_fwd_kernel", "ts": 170, "dur": 10, "args": {"stream": 8}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},
    ]
    trace, out = tmp_path / "trace.json", tmp_path / "cut.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    done = _run(str(trace), "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [k["name"] for k in result["kernels"]] == ["nvjet_sm90_gemm", "_route_chunk_kernel", "_fwd_kernel"]
    assert result["kernels"][1]["start_us"] == 10.0 and result["kernels"][1]["routing"]
    assert result["cut_us"] == {"idle": 10.0, "routing alone": 40.0, "routing beside others": 10.0,
                                "others without routing": 20.0, "span": 80.0}  # fmt: skip
    assert "_route_chunk_kernel" in done.stdout


def test_an_unreadable_trace_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = _run(str(bad))
    assert done.returncode == 2 and "cannot read the trace" in done.stderr
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"traceEvents": []}))
    done = _run(str(empty))
    assert done.returncode == 2 and "no GPU kernels" in done.stderr
