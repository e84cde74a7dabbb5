#!/usr/bin/env bash
# On the GPU machine (after `source scripts/device_setup.sh`): one round of fact training and its evaluation in a
# single call. Trains the arms for SECONDS (scripts/device_train_facts.sh; RESUME=1 continues them), then evaluates
# each arm's file on the evaluation split, all processes sharing the GPU: single facts at 4K and 16K (20 per kind),
# five facts at 16K, pass keys at 16K, perplexity on the Bible and Wikipedia. Results: $OUT/round.tgz and the
# weights files; the last lines printed are each cell's table rows.
# Usage: bash scripts/device_facts_round.sh SECONDS ARM [ARM...]   (a call of 600 s fits SECONDS = 300)
set -uo pipefail
budget=${1:?seconds of training}
shift
arms=("$@")
results=/tmp/round
mkdir -p "$results"
bash scripts/device_train_facts.sh "$budget" "$results" "${arms[@]}" > "$results/train.txt" 2>&1
for arm in "${arms[@]}"; do
  weights=/tmp/train_$arm/coda.safetensors
  [ -f "$weights" ] && bash scripts/device_eval_facts.sh "$weights" "$arm" "$results" &
done
wait
rm -f "$results"/coda_*.safetensors
tar czf "$OUT/round.tgz" -C /tmp round
for arm in "${arms[@]}"; do cp "/tmp/train_$arm/coda.safetensors" "$OUT/coda_$arm.safetensors" 2>/dev/null; done
tail -n 12 "$results/train.txt"
for cell in "$results"/*_m16 "$results"/*_f4 "$results"/*_ppl; do
  echo "== $cell"
  grep -E "^\| coda-bounded" "$cell/eval.md" | cut -c1-110
done
