#!/usr/bin/env bash
# The 7B layer's captured decode step on the GPU, short: the CapturedDecoder GPU tests (bf16, relative positions),
# then the suite's decode at 2K for the medium config (the static-cache and flash GQA steps beside it). Carries
# nothing. Usage: bash scripts/device_layer_decode.sh   (TEST_S, SUITE_S: seconds for each part, 75 and 70)
set -uo pipefail
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
timeout "${TEST_S:-75}" python -m pytest -q -m gpu tests/test_decode.py -k "bfloat16 and relative" > "$OUT/gpu_tests.txt" 2>&1
tail -n 2 "$OUT/gpu_tests.txt"
timeout "${SUITE_S:-70}" python benchmarks/run_suite.py --only decode --shapes 7B --configs medium --decode-contexts 2048 \
  --deadline-s $((${SUITE_S:-70} - 15)) --out "$OUT/suite" > "$OUT/suite.txt" 2>&1
grep -E "^\| (gqa|bounded|decode|fair)" "$OUT/suite.txt" | cut -c1-150
