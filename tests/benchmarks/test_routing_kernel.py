"""Smoke test of benchmarks/routing_kernel.py in its --quick mode (CPU, Triton's interpreter, a tiny bank config)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_benchmark_in_interpreter


def test_quick_run_times_each_bank_split_at_each_width_and_way_of_writing_keys(tmp_path: Path) -> None:
    done = run_benchmark_in_interpreter(
        "routing_kernel.py", "--quick", "--warps", "8", "--keys", "chain", "followers", "--banks-at", "filled",
        "empty", "--out", str(tmp_path),
    )  # fmt: skip
    rows = json.loads((tmp_path / "routing_kernel.json").read_text())["rows"]
    splits = ["both banks", "exact bank only", "summary bank only"]
    # one width: each row is a launch in the interpreter, and the widths differ only in a launch argument
    expected = [
        (split, at, 8, keys) for split in splits for at in ("filled", "empty") for keys in ("chain", "followers")
    ]
    assert [(row["banks"], row["banks_at"], row["warps"], row["keys"]) for row in rows] == expected
    for row in rows:
        # a 64-token chunk crosses 8 boundaries of 8, at 256 (filled) and at 32 (empty: right after the window)
        assert row["segments"] == 8 and row["launch_us"] > 0
    lines = done.stdout.strip().splitlines()
    assert lines[-13].startswith("tiny") and lines[-1].startswith("wrote ")
