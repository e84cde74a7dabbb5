"""benchmarks/kernel_compiles.py in its --quick mode (the tiny Llama; Triton's real compiler, for sm_90, on the CPU):
the inventory of binaries a first request compiles, and one routing binary for the eager and the graph paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_benchmark_compiling


def test_quick_run_lists_the_first_requests_binaries(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    done = run_benchmark_compiling("kernel_compiles.py", "--quick", "--threads", "2", "--out", str(tmp_path))
    result = json.loads((tmp_path / "kernel_compiles.json").read_text())
    names = [b["kernel"] for b in result["binaries"]]
    assert {"_route_chunk_kernel", "_fwd_kernel", "_decode_split_kernel", "_window_step_kernel"} <= set(names)
    # the eager forward and the graph step route with one binary (the position read from the device in both)
    assert names.count("_route_chunk_kernel") == 1
    routing = next(b for b in result["binaries"] if b["kernel"] == "_route_chunk_kernel")
    assert {"ingest: read", "ingest: tail forward", "answer: steps"} <= set(routing["phases"])
    # one forward binary for every chunk length: a tail of segment + 11 tokens (its lambda's rows not a multiple of
    # 16) used to compile a second one, about 20 s on a GPU machine in float32 (benchmarks/results/speed.md)
    assert names.count("_fwd_kernel") == 1
    forward = next(b for b in result["binaries"] if b["kernel"] == "_fwd_kernel")
    assert {"ingest: read", "ingest: tail forward", "answer: prompt forward"} <= set(forward["phases"])
    assert forward["constexprs"]["PREC"] == "tf32x3"  # the database's float32 tiles on CUDA (the default here)
    assert all(b["compile_s"] > 0 and b["cubin_bytes"] > 0 for b in result["binaries"])
    assert result["serial_s"] > 0 and result["threaded_s"] > 0
    assert done.stdout.strip().splitlines()[-1].startswith("wrote ")
