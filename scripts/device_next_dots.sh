#!/usr/bin/env bash
# On the GPU machine (no model needed; the platformdirs wheel carried in .pdwhl): the routing chains computing each
# segment's dots while the segment before writes its rows (dispatch.next_dots), checked and timed, and what slows a
# piece's products beside the routing (benchmarks/products_beside.py).
#   1. the routing kernel's GPU tests against the reference, float32 and bfloat16, with and without next dots
#      (TEST_K='' runs them all);
#   2. benchmarks/routing_kernel.py, key followers, next dots off and on, EMA row blocks of 64 and 32 columns (at 64
#      the device's Triton spills the summary program with next dots, compiled on the CPU: kernel_resources.py);
#   3. benchmarks/captured_prefill.py at 2K and 32K, 2 pieces, settings default and "next dots";
#   4. benchmarks/products_beside.py.
# Each step's log under $OUT/next_dots/; the tables are printed as they come.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .pdwhl/platformdirs-*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
out=$OUT/next_dots
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${TEST_S:-120} python -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_routing.py \
  -k "${TEST_K-reference_on_gpu}" > "$out/gpu_tests_routing.txt" 2>&1
echo "routing GPU tests: $(tail -n 1 "$out/gpu_tests_routing.txt")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests_routing.txt" | head -5
timeout ${KERNEL_S:-150} python benchmarks/routing_kernel.py --keys followers --next-dots off on --ema-block 64 32 --out "$out" \
  > "$out/routing_kernel.txt" 2>&1
tail -n 14 "$out/routing_kernel.txt"
timeout ${PREFILL_S:-180} python benchmarks/captured_prefill.py --lengths 2048 32768 --pieces 2 --rounds ${ROUNDS:-7} \
  --settings default "next dots" --out "$out" > "$out/captured_prefill.txt" 2>&1
grep -E "^\|" "$out/captured_prefill.txt" | head -n 16
timeout ${BESIDE_S:-100} python benchmarks/products_beside.py --tokens 8192 --rounds 7 --out "$out" \
  > "$out/products_beside.txt" 2>&1
tail -n 9 "$out/products_beside.txt"
