#!/usr/bin/env bash
# On the GPU machine, no model needed (carry nothing): the GPU tests of the split decode kernel (a KV group's query
# heads as the rows of its products), the static-cache step on it (KEYS_FROM_ZERO) and the graph decoder; then the
# suite's decode section for the 7B layer, medium config: the static-cache GQA step against the fixed-length flash
# step (the fairness rows of suite_targets.py) and the bounded step against both. Results in $OUT as they come.
# Usage: bash scripts/device_fair_baseline.sh   (TEST_S and SUITE_S: seconds for each part, 120 and 150;
# CONTEXTS: the decode contexts, default 2048,32768,131072)
set -uo pipefail
export PYTHONPATH=src
tests=${TEST_S:-120}
suite=${SUITE_S:-150}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
timeout "$tests" python -m pytest -q -m gpu tests/kernels/test_diff_attention.py::test_one_token_step_matches_reference \
  tests/test_baseline.py tests/models/test_graph_decode.py > "$OUT/gpu_tests.txt" 2>&1
timeout "$suite" python benchmarks/run_suite.py --only decode --shapes 7B --configs medium \
  --decode-contexts "${CONTEXTS:-2048,32768,131072}" --deadline-s $((suite - 25)) --out "$OUT/suite" > "$OUT/suite.txt" 2>&1
tail -n 4 "$OUT/gpu_tests.txt"
grep -E "^\| (7B|decode|fair)" "$OUT/suite.txt" | cut -c1-160
