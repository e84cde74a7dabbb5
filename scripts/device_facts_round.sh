#!/usr/bin/env bash
# On the GPU machine (after `source scripts/device_setup.sh`): one round of fact training and its evaluation in a
# single call. Trains the arms for SECONDS (scripts/device_train_facts.sh; RESUME=1 continues them), then evaluates
# each arm's file on the evaluation split, all processes sharing the GPU: single facts at 4K and 16K (20 per kind),
# five facts at 16K, pass keys at 16K, perplexity on the Bible and Wikipedia. Results: $OUT/round.tgz and the
# weights files; the last lines printed are each cell's table rows and each arm's gate load (needle_trace on the CPU,
# 8K pass-key document: the share of ordinary tokens above tau_exact, which says whether the exact bank floods).
# EVAL_ONLY=1 skips the training and evaluates the arms' files left in /tmp/train_ARM by an earlier call (the machine
# still warm): a long training call, then this one. GPU_TESTS=1 also runs the GPU kernel tests beside the training (results/gpu_tests.txt;
# GPU_TEST_PATHS="tests/... tests/..." picks which).
# Usage: bash scripts/device_facts_round.sh SECONDS ARM [ARM...]   (a call of 600 s fits SECONDS = 300)
set -uo pipefail
budget=${1:?seconds of training}
shift
arms=("$@")
results=/tmp/round
mkdir -p "$results"
if [ "${GPU_TESTS:-0}" = 1 ]; then
  read -r -a test_paths <<< "${GPU_TEST_PATHS:-tests/test_decode.py tests/kernels/test_routing.py \
    tests/kernels/test_diff_attention.py tests/kernels/test_combine.py tests/kernels/test_rope.py tests/test_baseline.py}"
  python -m pytest -q -m gpu "${test_paths[@]}" > "$results/gpu_tests.txt" 2>&1 &
fi
if [ "${EVAL_ONLY:-0}" != 1 ]; then
  bash scripts/device_train_facts.sh "$budget" "$results" "${arms[@]}" > "$results/train.txt" 2>&1
else
  for arm in "${arms[@]}"; do cp "/tmp/train_$arm/log.jsonl" "$results/train_$arm.jsonl" 2>/dev/null; done
fi
for arm in "${arms[@]}"; do
  weights=/tmp/train_$arm/coda.safetensors
  [ -f "$weights" ] || continue
  bash scripts/device_eval_facts.sh "$weights" "$arm" "$results" &
  OMP_NUM_THREADS=4 python benchmarks/needle_trace.py --weights "$weights" --length 8192 --trials 1 --seed 1 \
    --out "$results/${arm}_gatecount_pk8k.json" > "$results/${arm}_gatecount.txt" 2>&1 &
done
wait
rm -f "$results"/coda_*.safetensors
tar czf "$OUT/round.tgz" -C /tmp round
for arm in "${arms[@]}"; do cp "/tmp/train_$arm/coda.safetensors" "$OUT/coda_$arm.safetensors" 2>/dev/null; done
[ -f "$results/train.txt" ] && tail -n 12 "$results/train.txt"
[ -f "$results/gpu_tests.txt" ] && tail -n 3 "$results/gpu_tests.txt"
for arm in "${arms[@]}"; do echo "$arm: $(grep -h "above tau_exact" "$results/${arm}_gatecount.txt")"; done
for cell in "$results"/*_m16 "$results"/*_f4 "$results"/*_ppl; do
  echo "== $cell"
  grep -E "^\| coda-bounded" "$cell/eval.md" | cut -c1-110
done
