"""benchmarks/kernel_resources.py in its --quick mode (a tiny layer; Triton's real compiler, for sm_90, on the CPU):
each prefill binary's resources read from its cubin, and the settings reaching the kernels they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_benchmark_compiling


def test_quick_run_reads_each_binarys_resources(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    done = run_benchmark_compiling("kernel_resources.py", "--quick", "--settings", "default", "keys in chains",
                                   "routing 4 warps", "--out", str(tmp_path))  # fmt: skip
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())["rows"]
    by = {(r["setting"], r["kernel"]): r for r in rows}
    assert {"_route_chunk_kernel", "_fwd_kernel"} <= {kernel for _, kernel in by}
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["instructions"] > 0 and row["warps"] > 0
    # each setting reached the routing binary it names, and only the switches it names
    settings = ("default", "keys in chains", "routing 4 warps")
    default, in_chains, four = (by[(s, "_route_chunk_kernel")] for s in settings)
    assert default["constexprs"]["KEY_FOLLOWERS"] == "True" and in_chains["constexprs"]["KEY_FOLLOWERS"] == "False"
    assert default["warps"] == in_chains["warps"] == 8 and four["warps"] == 4
    assert four["constexprs"]["KEY_FOLLOWERS"] == "True"
    # the routing chain synchronises its warps: a SASS parse that found no barrier read nothing
    assert default["BAR"] > 0 and default["instructions"] > default["BAR"]
    assert done.stdout.strip().splitlines()[-1].startswith("wrote ")
