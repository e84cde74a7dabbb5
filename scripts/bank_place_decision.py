"""On the GPU machine, after scripts/device_prefill_settings.sh: prints ``on`` when the routing chains' on-chip banks
passed their GPU tests and made the captured 7B prefill faster at every length (medians of the same run), else
``off``, with the figures it read. Usage: python scripts/bank_place_decision.py RESULTS_DIR"""

import json
import sys
from pathlib import Path

results = Path(sys.argv[1])
last = (results / "gpu_tests.txt").read_text().strip().splitlines()[-1]  # pytest's summary line
passed = " passed" in last and " failed" not in last and " error" not in last
rows = json.loads((results / "captured_prefill.json").read_text())["rows"]
median = {(r["length"], r["variant"]): r["median_ms"] for r in rows}
faster = []
for length in sorted({r["length"] for r in rows}):
    base, ours = median.get((length, "captured, 2 pieces")), median.get((length, "captured, 2 pieces, bank on chip"))
    if base is not None and ours is not None:
        faster.append(ours < base)
        print(f"{length} tokens: in memory {base:.3f} ms, on chip {ours:.3f} ms", file=sys.stderr)
print("on" if passed and faster and all(faster) else "off")
