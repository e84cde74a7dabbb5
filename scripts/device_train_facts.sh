#!/usr/bin/env bash
# On the GPU machine, after the SmolLM2 set-up (benchmarks/PLAN.md): phase-2 training on fact documents from the
# shipped weights, two arms at once on one GPU (phase 2 leaves it mostly idle): "facts" (fact and pass-key documents,
# keep targets from the answers' tokens) and "recurring" (the same plus --recurring-keep on plain rows).
# Usage: bash scripts/device_train_facts.sh SECONDS OUT_DIR
set -euo pipefail
budget=${1:?seconds of training}
out=${2:?folder for the weights and logs}
R="novelty=0.9 match=0.97 max_inserts=16"  # the shipped file's thresholds: it starts in phase 2
common=(--init-weights src/coda_gqa_l/weights/smollm2-135m-instruct-coda.safetensors --routing $R
  --phase2-steps 2000 --phase2-seq-len 2048 --batch-size 8 --retrieval-fraction 0.2 --fact-fraction 0.5
  --lr 5e-4 --gate-lr 5e-3 --warmup 5 --save-every 10 --time-budget "$budget")
python -c "from coda_gqa_l.models.loader import load_smollm2; load_smollm2(progress=False)"  # export once
for arm in facts recurring; do
  extra=(); [ "$arm" = recurring ] && extra=(--recurring-keep)
  python -m coda_gqa_l.training.cli "${common[@]}" "${extra[@]}" --out "/tmp/train_$arm" > "/tmp/train_$arm.log" 2>&1 &
done
wait
mkdir -p "$out"
for arm in facts recurring; do
  cp "/tmp/train_$arm/coda.safetensors" "$out/coda_$arm.safetensors"
  cp "/tmp/train_$arm/log.jsonl" "$out/train_$arm.jsonl"
  tail -c 2000 "/tmp/train_$arm.log" | tr '\r' '\n' | tail -3
done
