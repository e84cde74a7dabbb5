"""Smoke test of benchmarks/question_read.py in its --quick mode (CPU, Triton's interpreter, a tiny random Llama):
both ways of reading a short piece after a document give the same next token, and the table names the crossover."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_benchmark_in_interpreter


def test_quick_run_reads_each_length_both_ways(tmp_path: Path) -> None:
    done = run_benchmark_in_interpreter("question_read.py", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "question_read.json").read_text())
    assert [row["tokens"] for row in result["rows"]] == [2]
    for row in result["rows"]:
        assert len(row["forward_s"]) == len(row["steps_s"]) == 1
        assert row["same_argmax"]  # float32 in the interpreter: both ways read the same state
    assert result["crossover"] in (0, 2)
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith("longest length where the steps are faster")
    assert lines[-1].startswith("wrote ")
