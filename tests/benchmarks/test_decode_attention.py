"""Smoke test of benchmarks/decode_attention.py in its --quick mode (CPU, Triton's interpreter, tiny shapes)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_benchmark_in_interpreter


def test_quick_run_compares_both_paths(tmp_path: Path) -> None:
    done = run_benchmark_in_interpreter(
        "decode_attention.py", "--quick", "--calls", "2", "--repeats", "1", "--out", str(tmp_path)
    )
    result = json.loads((tmp_path / "decode_attention.json").read_text())
    assert len(result["rows"]) == 2 and result["dtype"] == "float32"
    for row in result["rows"]:
        assert row["split_us"] > 0 and row["one_program_us"] > 0
        assert row["max_abs_difference"] < 1e-5  # the two paths agree to float32 rounding
    assert "speed-up" in done.stdout
