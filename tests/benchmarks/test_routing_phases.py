"""Smoke test of benchmarks/routing_phases.py in its --quick mode (CPU, Triton's interpreter, a tiny bank config):
every program's phases reported, the stamps zeros there."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_benchmark_in_interpreter


def test_quick_run_reports_every_phase_of_every_program(tmp_path: Path) -> None:
    run_benchmark_in_interpreter("routing_phases.py", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "routing_phases.json").read_text())["rows"]
    phases = {(row["program"], row["phase"]) for row in rows}
    for program, count in (("exact chain", 5), ("summary chain", 6), ("exact keys", 3), ("summary keys", 3)):
        assert len([p for p in phases if p[0] == program]) == count, program  # its phases and "to the next segment"
    assert all(row["median_cycles"] == 0 for row in rows if row["program"] != "launch")  # the interpreter's zeros
    assert all(row["samples"] > 0 for row in rows if row["program"] != "launch")
