"""benchmarks/step_operations.py in its --quick mode (the tiny Llama, the GPU path counted on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_counts_a_chunk_read_and_a_plain_step(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # recorded launches, no interpreter
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_operations.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads((tmp_path / "step_operations.json").read_text())["steps"]
    read, step = steps["chunk read"], steps["plain step"]
    # the chunk's window traffic and segment extras are one kernel each: no gathers, concatenations or index copies
    assert {"_extend_window_kernel", "_segment_extras_kernel", "_route_chunk_kernel"} <= set(read["triton"])
    assert not {"index_select", "index_copy_"} & set(read["pytorch"])
    assert "_route_chunk_kernel" not in step["triton"] and "_window_step_kernel" in step["triton"]
    assert 0 < step["pytorch_per_layer"] < read["pytorch_per_layer"]
    assert done.stdout.strip().splitlines()[-1].startswith("wrote ")
