"""Smoke test of benchmarks/profile_ingest.py in its --quick mode (CPU, tiny random Llama, a few seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_profile_reports_both_models_by_family(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_ingest.py"), "--quick", "--device", "cpu", "--out",
         str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "profile_ingest.json").read_text())
    assert (result["context"], result["chunk"], result["repeats"]) == (512, 128, 1)
    models = result["models"]
    assert set(models) == {"bounded (BoundedCache)", "original (DynamicCache)"}
    for figures in models.values():
        assert figures["chunk_wall_s"] > 0 and figures["tokens_per_s"] > 0
        assert figures["top"] and sum(figures["families_s"].values()) > 0
        assert figures["host_syncs"] is None and figures["launches"] is None  # CUDA-only counts
    # the bounded model's own work shows up where it belongs: its routing and attention operators are classified
    assert models["bounded (BoundedCache)"]["families_s"].get("matmul", 0) > 0
    assert "| chunk wall ms |" in done.stdout and "top kernels or operators" in done.stdout
