#!/usr/bin/env bash
# On the GPU machine (no model needed; the platformdirs wheel carried): the attention forward's block shapes and
# its two stream layouts (kernels/diff_attention.STREAMS_AS_ROWS), checked and timed inside the captured prefill.
#   1. the GPU tests of the fused attention (bfloat16 against the reference, every path);
#   2. benchmarks/attention_forward_configs.py: each candidate shape timed inside CapturedPrefill, rounds in turn
#      (with SWEEP_64=1 also SmolLM2's head size 64);
#   3. the GPU tests of the captured prefill;
#   4. benchmarks/captured_prefill.py with 2 pieces (bare GQA, the eager prefill and the captured one).
# Results under $OUT/attention_forward/; the tables are printed last.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/platformdirs-4.14.9-py3-none-any.whl
export PYTHONPATH=/tmp/site:src TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_attention_forward}
out=$OUT/attention_forward
mkdir -p "$out"
timeout ${TEST_S:-150} python -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_diff_attention.py \
  > "$out/gpu_tests_attention.txt" 2>&1
echo "attention GPU tests: $(tail -n 1 "$out/gpu_tests_attention.txt")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests_attention.txt" | head -5
timeout ${SWEEP_S:-230} python benchmarks/attention_forward_configs.py --out "$out" --rounds ${ROUNDS:-5} ${SWEEP_ARGS:-} \
  > "$out/attention_forward_configs.txt" 2>&1
grep -E "^\||Error" "$out/attention_forward_configs.txt" | tail -n 24
if [ -n "${SWEEP_64:-}" ]; then  # head size 64 (SmolLM2's layer)
  timeout ${SWEEP_64_S:-150} python benchmarks/attention_forward_configs.py --layer SmolLM2 --out "$out" \
    --rounds ${ROUNDS:-5} > "$out/attention_forward_configs_64.txt" 2>&1
  grep -E "^\||Error" "$out/attention_forward_configs_64.txt" | tail -n 14
fi
timeout ${CAPTURED_TEST_S:-110} python -m pytest -q -m gpu -p no:cacheprovider tests/test_captured_prefill.py \
  > "$out/gpu_tests_captured.txt" 2>&1
echo "captured prefill GPU tests: $(tail -n 1 "$out/gpu_tests_captured.txt")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests_captured.txt" | head -5
timeout ${BENCH_S:-80} python benchmarks/captured_prefill.py --pieces 2 --rounds 7 --out "$out" \
  > "$out/captured_prefill.txt" 2>&1
grep -E "^\|" "$out/captured_prefill.txt"
