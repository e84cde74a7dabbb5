"""Smoke test of benchmarks/decode_attention.py in its --quick mode (CPU, Triton's interpreter, tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_compares_both_paths(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "TRITON_INTERPRET": "1",
        "CODA_GQA_L_KERNELS": "triton",
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_attention.py"), "--quick", "--calls", "2", "--repeats", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "decode_attention.json").read_text())
    assert len(result["rows"]) == 2 and result["dtype"] == "float32"
    for row in result["rows"]:
        assert row["split_us"] > 0 and row["one_program_us"] > 0
        assert row["max_abs_difference"] < 1e-5  # the two paths agree to float32 rounding
    assert "speed-up" in done.stdout
