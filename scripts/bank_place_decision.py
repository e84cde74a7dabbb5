"""On the GPU machine, after scripts/device_prefill_settings.sh: prints the value for ``routing.BANKS_ON_CHIP`` that
the run supports: the on-chip setting with the lowest captured 7B prefill medians, when it beat the shipped kernel
(in memory) at every length of the same run and the GPU tests passed, else ``()``; the figures it read go to
stderr. Usage: python scripts/bank_place_decision.py RESULTS_DIR"""

import json
import sys
from pathlib import Path

SETTINGS = {"banks on chip": '("exact", "summary")', "summary on chip": '("summary",)'}
results = Path(sys.argv[1])
last = (results / "gpu_tests.txt").read_text().strip().splitlines()[-1]  # pytest's summary line
passed = " passed" in last and " failed" not in last and " error" not in last
rows = json.loads((results / "captured_prefill.json").read_text())["rows"]
median = {(r["length"], r["variant"]): r["median_ms"] for r in rows}
lengths = sorted({r["length"] for r in rows})
best, best_total = "()", None
for setting, value in SETTINGS.items():
    pairs = [
        (median.get((n, "captured, 2 pieces")), median.get((n, f"captured, 2 pieces, {setting}"))) for n in lengths
    ]
    if not pairs or any(a is None or b is None for a, b in pairs):
        continue
    figures = [f"{n}: {b:.3f} ms against {a:.3f}" for n, (a, b) in zip(lengths, pairs, strict=True)]
    print(f"{setting}: " + ", ".join(figures), file=sys.stderr)
    total = sum(b / a for a, b in pairs)
    if passed and all(b < a for a, b in pairs) and (best_total is None or total < best_total):
        best, best_total = value, total
print(f"tests: {last}", file=sys.stderr)
print(best)
