#!/usr/bin/env bash
# On the GPU machine (no model needed; carry .pdwhl or .device: the platformdirs wheel as WHEEL_DIR): the captured
# prefill's host launches and uneven pieces (benchmarks/PLAN.md, twentieth session, items 0 and 2), in one call.
#   1. the GPU tests of the captured prefill and of the graph decoder (which copy states), with
#      state.ONE_LAUNCH_STATE_COPIES on as src has it; a copy of src with it off (/tmp/src_off) for the timings;
#   2. benchmarks/captured_prefill.py at 2K and 32K, 2 pieces and the --weights variants (WEIGHTS), in processes
#      alternating the flag off and on, twice each (ROUNDS rounds a process), the last with --trace;
#   3. benchmarks/trace_gaps.py on that trace: when the graph starts, and the span cut by what runs;
#   4. benchmarks/prefill_host_time.py with the flag off and on: the host's time in a call, step by step.
# Results under $OUT/prefill_launches/ (a tarball); the tables are printed last. Env: WEIGHTS, ROUNDS, PROCESSES,
# TEST_S, BENCH_S.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site "${WHEEL_DIR:-.device/whl}"/platformdirs-*.whl
out=/tmp/prefill_launches
mkdir -p "$out"
# the flag is on in src since the twenty-first session: "off" is a copy with it set off
rm -rf /tmp/src_off && cp -r src /tmp/src_off
sed -i 's/^ONE_LAUNCH_STATE_COPIES = True$/ONE_LAUNCH_STATE_COPIES = False/' /tmp/src_off/coda_gqa_l/state.py
grep -q '^ONE_LAUNCH_STATE_COPIES = False$' /tmp/src_off/coda_gqa_l/state.py || { echo "flag not found in state.py" >&2; exit 2; }
PYTHONPATH=/tmp/site:src timeout "${TEST_S:-150}" python -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_captured_prefill.py tests/models/test_graph_decode.py > "$out/gpu_tests_on.txt" 2>&1
echo "GPU tests, one-launch state copies on: $(tail -n 1 "$out/gpu_tests_on.txt")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests_on.txt" | head -5
read -r -a weights <<< "${WEIGHTS:-1,2,1 1,4,1 1,2,2,1 1,3}"
# with .old/src carried (an earlier commit's src), its prefill is timed too, as "base"
flags=(off on); [ -d .old/src ] && flags=(base off on)
last=${PROCESSES:-2}  # processes a variant (the base once), the last "on" one traced
for round in $(seq 1 "$last"); do
  for flag in "${flags[@]}"; do
    [ "$flag$round" = base2 ] && continue  # the base once: the call's time goes to the new code
    path=src; [ "$flag" = off ] && path=/tmp/src_off; [ "$flag" = base ] && path=.old/src
    trace=(); [ "$round$flag" = "${last}on" ] && trace=(--trace)
    PYTHONPATH=/tmp/site:$path timeout "${BENCH_S:-130}" python benchmarks/captured_prefill.py --lengths 2048 32768 \
      --pieces 2 --weights "${weights[@]}" --rounds "${ROUNDS:-7}" "${trace[@]}" --out "$out/$flag$round" \
      > "$out/$flag$round.txt" 2>&1
    echo "== $flag, process $round"
    grep -E "^\| [0-9]" "$out/$flag$round.txt" | grep -E "captured|bare" | cut -d'|' -f2-6
  done
done
for length in 2048 32768; do
  trace=$out/on$last/captured_prefill_trace_$length.json
  [ -f "$trace" ] && PYTHONPATH=src python benchmarks/trace_gaps.py "$trace" --top 0 --out "$out/gaps_$length.json" \
    | tail -n 2 | head -n 1
done
for flag in off on; do
  path=src; [ "$flag" = off ] && path=/tmp/src_off
  PYTHONPATH=/tmp/site:$path timeout 90 python benchmarks/prefill_host_time.py --lengths 2048 32768 \
    --out "$out/host_$flag" > "$out/host_$flag.txt" 2>&1
  grep -E "^(7B|\| [0-9])" "$out/host_$flag.txt"
done
tar czf "$OUT/prefill_launches.tgz" -C /tmp prefill_launches
