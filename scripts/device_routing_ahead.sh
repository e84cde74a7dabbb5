#!/usr/bin/env bash
# On the GPU machine (no model needed; the platformdirs wheel installed to /tmp/site): a prefill's routing launched a
# chunk ahead on a side stream (CODA_GQA_L_ROUTING_AHEAD), checked and timed against routing each chunk in turn.
#   1. the GPU tests of routing ahead (bit for bit against in turn), the captured decoder and no-host-sync tests;
#   2. the 7B layer's prefill and routing share, routing ahead off then on, in one call (for each block size in
#      $BLOCKS, default 4096).
# Results under $OUT/routing_ahead/; the tables are printed last.
set -uo pipefail
export PYTHONPATH=/tmp/site:src TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_ahead}
out=$OUT/routing_ahead
mkdir -p "$out"
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/test_routing_ahead.py tests/test_decode.py \
  tests/test_no_host_sync.py > "$out/gpu_tests.txt" 2>&1
echo "GPU tests: $(tail -n 1 "$out/gpu_tests.txt")"
for block in ${BLOCKS:-4096}; do
  for on in 0 1; do
    CODA_GQA_L_ROUTING_AHEAD=$on timeout 170 python benchmarks/run_suite.py --only prefill,routing --shapes 7B \
      --configs medium --deadline-s 120 --no-plots --block-size "$block" --out "$out/suite_${block}_$on" \
      > "$out/suite_${block}_$on.txt" 2>&1
    echo "block $block, routing ahead $on:"
    python - "$out/suite_${block}_$on/suite.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    if r.get("section") == "prefill":
        print(f"  prefill {r['method']:>16} L {r['length']:>6}: {r.get('tokens_per_s', 0) / 1e6:.3f}M tok/s")
    if r.get("section") == "routing":
        keys = ("sync_hook_share", "profiler_share", "named_kernel_share", "exposed_share", "prefill_s", "profiled_span_ms")
        print("  routing", {k: round(r[k], 4) if isinstance(r.get(k), float) else r.get(k) for k in keys})
PY
  done
done
