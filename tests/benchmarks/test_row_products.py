"""Smoke test of benchmarks/row_products.py in its --quick mode (CPU, Triton's interpreter, tiny shapes): every block
shape's kernel result within the rule against the product it would replace."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_benchmark_in_interpreter


def test_quick_run_checks_every_block_shape(tmp_path: Path) -> None:
    done = run_benchmark_in_interpreter("row_products.py", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "row_products.json").read_text())
    assert [row["shape"] for row in result["rows"]] == ["inputs", "down"]
    for row in result["rows"]:
        assert row["cublas_us"] > 0 and len(row["kernel"]) == 5
        assert all(cell["within_rule"] and cell["us"] > 0 for cell in row["kernel"].values())
    assert done.stdout.strip().splitlines()[-1].startswith("wrote ")
