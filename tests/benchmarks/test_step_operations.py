"""benchmarks/step_operations.py in its --quick mode (the tiny Llama, the GPU path counted on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_benchmark_compiling


def test_quick_run_counts_a_chunk_read_and_a_plain_step(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    done = run_benchmark_compiling("step_operations.py", "--quick", "--out", str(tmp_path))  # launches recorded
    steps = json.loads((tmp_path / "step_operations.json").read_text())["steps"]
    read, step = steps["chunk read"], steps["plain step"]
    # the chunk's window traffic and segment extras are one kernel each: no gathers, concatenations or index copies
    assert {"_extend_window_kernel", "_segment_extras_kernel", "_route_chunk_kernel"} <= set(read["triton"])
    assert not {"index_select", "index_copy_"} & set(read["pytorch"])
    assert "_route_chunk_kernel" not in step["triton"] and "_window_step_kernel" in step["triton"]
    assert 0 < step["pytorch_per_layer"] < read["pytorch_per_layer"]
    assert done.stdout.strip().splitlines()[-1].startswith("wrote ")


def test_layer_run_counts_a_captured_decoders_routing_and_plain_steps(tmp_path: Path) -> None:
    """``--layer``: the plain step reads the segment's kept extras (one window-step kernel, no extras or window
    gather), the routing step computes them; ``--fold`` leaves the plain step one input kernel."""
    pytest.importorskip("triton")
    counts = {}
    for fold in ([], ["--fold"]):
        out = tmp_path / ("folded" if fold else "plain")
        run_benchmark_compiling("step_operations.py", "--layer", "256", "4", "2", *fold, "--out", str(out))
        counts[bool(fold)] = json.loads((out / "step_operations_layer.json").read_text())["steps"]
    route, step = counts[False]["routing step"], counts[False]["plain step"]
    assert {"_route_chunk_kernel", "_segment_extras_kernel", "_extend_window_kernel"} <= set(route["triton"])
    assert set(step["triton"]) == {"_window_step_kernel", "_rotate_kernel", "_decode_split_kernel",
                                   "_decode_combine_kernel", "_rope_table_kernel"}  # fmt: skip
    assert step["pytorch_per_layer"] < 20  # 66 and 6 kernels before the kept extras (7B shape), 19 before the table
    folded = counts[True]["plain step"]
    assert "_step_inputs_kernel" in folded["triton"] and "_window_step_kernel" not in folded["triton"]
    assert folded["pytorch_per_layer"] < step["pytorch_per_layer"] < route["pytorch_per_layer"]
