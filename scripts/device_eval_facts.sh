#!/usr/bin/env bash
# On the GPU machine (after `source scripts/device_setup.sh`): the fact-memory evaluation of one weights file on the
# evaluation split, three coda-eval processes sharing the GPU: single facts at 4K (NAME_f4) and 16K with five facts
# per document at 16K (NAME_m16), 20 per kind; pass keys at 16K and perplexity on the Bible and Wikipedia (NAME_ppl).
# Usage: bash scripts/device_eval_facts.sh WEIGHTS NAME RESULTS_DIR (it returns when all three have ended)
set -uo pipefail
weights=${1:?weights file}
name=${2:?name of the cells}
results=${3:?folder}
mkdir -p "$results"
eval_cmd=(python -m coda_gqa_l.evaluation.cli --weights "$weights" --batch 20 --seed 1234 --methods coda-bounded
  --time-budget 200)
"${eval_cmd[@]}" --texts wikipedia --trials 0 --lengths 2048 --fact-trials 20 --fact-lengths 16384 --fact-multi 5 \
  --out "$results/${name}_m16" > "$results/${name}_m16.log" 2>&1 &
"${eval_cmd[@]}" --texts wikipedia --trials 0 --lengths 2048 --fact-trials 20 --fact-lengths 4096 \
  --out "$results/${name}_f4" > "$results/${name}_f4.log" 2>&1 &
"${eval_cmd[@]}" --texts bible wikipedia --lengths 2048 4096 8192 16384 --passkey-lengths 16384 --depths 0.1 0.5 \
  --trials 20 --fact-trials 0 --out "$results/${name}_ppl" > "$results/${name}_ppl.log" 2>&1 &
wait
