#!/usr/bin/env bash
# On the GPU machine (no model needed; the platformdirs wheel installed to /tmp/site): the layer's prefill through
# CapturedPrefill (one graph replay a chunk, its routing pipelined in pieces on side streams), checked and timed.
#   1. the GPU tests of the captured prefill, routing ahead and the captured decoder;
#   2. benchmarks/captured_prefill.py: bare GQA, the eager prefill and the captured one by pieces, rounds in turn;
#   3. the suite's prefill and routing sections at the 7B shape (its bounded row is the captured prefill now);
#   4. with SWEEP=1, benchmarks/attention_forward_configs.py (block shapes of the attention forward).
# Results under $OUT/captured_prefill/; the tables are printed last.
set -uo pipefail
export PYTHONPATH=/tmp/site:src TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_captured}
out=$OUT/captured_prefill
mkdir -p "$out"
timeout ${TEST_S:-200} python -m pytest -q -m gpu -p no:cacheprovider tests/test_captured_prefill.py \
  tests/test_routing_ahead.py tests/test_decode.py > "$out/gpu_tests.txt" 2>&1
echo "GPU tests: $(tail -n 1 "$out/gpu_tests.txt")"
grep -E "^(FAILED|ERROR)|Error" "$out/gpu_tests.txt" | head -20
timeout ${BENCH_S:-200} python benchmarks/captured_prefill.py --out "$out" ${BENCH_ARGS:-} > "$out/captured_prefill.txt" 2>&1
tail -n 30 "$out/captured_prefill.txt"
if [ -z "${SKIP_SUITE:-}" ]; then
  timeout 170 python benchmarks/run_suite.py --only prefill,routing --shapes 7B --configs medium --deadline-s 120 \
    --no-plots --out "$out/suite" > "$out/suite.txt" 2>&1
  python - "$out/suite/suite.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for r in data["rows"]:
    if r.get("section") == "prefill":
        print(f"  prefill {r['method']:>22} L {r['length']:>6}: {r.get('tokens_per_s', 0) / 1e6:.3f}M tok/s {r.get('status')}")
    if r.get("section") == "routing":
        print("  routing", {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if "share" in k or "ms" in k})
for t in data.get("targets", []):
    print(f"  target {t['name']}: {t['value'] if t['value'] is None else round(t['value'], 3)} ({t['status']})")
PY
fi
if [ -n "${SWEEP:-}" ]; then
  timeout ${SWEEP_S:-240} python benchmarks/attention_forward_configs.py --out "$out" > "$out/attention_forward_configs.txt" 2>&1
  grep -v Warn "$out/attention_forward_configs.txt" | tail -n 25
fi
