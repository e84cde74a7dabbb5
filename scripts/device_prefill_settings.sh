#!/usr/bin/env bash
# On the GPU machine (no model needed; carry .device or any folder with the platformdirs wheel as WHEEL_DIR): the
# prefill's kernel settings not shipped, checked and timed in one call.
#   1. GPU tests of the routing kernel (float32 and bfloat16), of its phase stamps and of the captured prefill (TESTS:
#      other test files);
#   2. benchmarks/routing_kernel.py: one chunk's routing, the key rows written by followers;
#   3. benchmarks/captured_prefill.py with --settings default and "stacking pass" (SETTINGS; 2 pieces; rounds visit
#      every variant in turn);
#   4. benchmarks/routing_phases.py: where a routing segment's time goes, each phase's cycles.
# Results under $OUT/prefill_settings/; the tables are printed last. Env: TESTS, TEST_S, BENCH_S, SETTINGS, ROUNDS,
# PHASES_S.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site "${WHEEL_DIR:-.device/whl}"/platformdirs-*.whl
export PYTHONPATH=/tmp/site:src TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_prefill_settings}
out=$OUT/prefill_settings
mkdir -p "$out"
timeout ${TEST_S:-240} python -m pytest -q -m gpu -p no:cacheprovider \
  ${TESTS:-tests/kernels/test_routing.py tests/test_captured_prefill.py} > "$out/gpu_tests.txt" 2>&1
echo "GPU tests: $(tail -n 1 "$out/gpu_tests.txt")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.txt" | head -10
# the phase stamps on the GPU (the test is not marked: on a GPU machine it runs the compiled kernel)
timeout 90 python -m pytest -q -p no:cacheprovider tests/kernels/test_routing.py -k phase > "$out/phase_test.txt" 2>&1
echo "phase stamps test: $(tail -n 1 "$out/phase_test.txt")"
timeout 150 python benchmarks/routing_kernel.py --keys followers --out "$out" > "$out/routing_kernel.txt" 2>&1
tail -n 7 "$out/routing_kernel.txt"
eval "settings=(${SETTINGS:-default \"stacking pass\"})"
timeout ${BENCH_S:-200} python benchmarks/captured_prefill.py --pieces 2 --rounds ${ROUNDS:-7} --settings "${settings[@]}" \
  --out "$out" > "$out/captured_prefill.txt" 2>&1
grep -E "^\||Error" "$out/captured_prefill.txt"
timeout ${PHASES_S:-90} python benchmarks/routing_phases.py --out "$out" > "$out/routing_phases.txt" 2>&1
grep -E "summary chain|exact chain|launch|Error" "$out/routing_phases.txt"
