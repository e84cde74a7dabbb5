#!/usr/bin/env bash
# On the GPU machine, after the SmolLM2 set-up (benchmarks/PLAN.md): phase-2 training on fact documents from the
# shipped weights, several arms at once on one GPU (phase 2 leaves it mostly idle). The arms:
#   facts      fact and pass-key documents, keep targets from the answers' tokens (2026-12-02, before tau_exact 0.5)
#   recurring  the same plus --recurring-keep on plain rows (the self-supervised signal)
#   multi4096  many facts per row (up to 10, up to 5 asked), 4,096-token rows, trained at the shipped tau_exact 0.5
#   multi2048  the same with 2,048-token rows and twice the rows per update
#   distill    multi2048 plus a KL loss to the original model on every non-answer token (--distill-weight 1)
#   distill_lowlr  the same with the LoRA at a smaller learning rate (2e-4; the gates keep theirs)
#   distill_vf0  distill with no value-first statements (--value-first-share 0: the shipped file's own training
#              patterns), for the Bible without teaching the gate value-first keeps
#   distill_vf05  distill with one fact in twenty stated value first: about twice the shipped gate load, still under
#              the exact bank's 60 slots per 16K tokens if the load grows with the share
#   distill_vf05_4096  the same on 4,096-token rows (8 per update): the answer loss then sees read-outs from further
#              back, among more held tokens (results/facts.md: distill_vf05's 16K misses are read-out)
#   distill_vf05_after  distill_vf05 whose value-first statements keep the tokens after the value, not the value
#              (--value-first-keep after): tokens that have read the value and the statement's frame, which a causal
#              gate can recognise (benchmarks/results/facts.md: keeping the value itself floods the exact bank)
#   distill_vf20_after  the same with one fact in five value first
#   refuse     multi2048 with the hinge's refusal side per false write (--gate-refuse violations): value-first rows
#              without flooding the exact bank (benchmarks/results/facts.md, "Value-first rows flood the exact bank")
#   refuse_distill  the same plus --distill-weight 1 (the Bible)
#   refuse_vf10  refuse with one fact in ten stated value first (--value-first-share 0.1; unset, about one in five)
# Usage: bash scripts/device_train_facts.sh SECONDS OUT_DIR ARM [ARM...]
# RESUME=1 continues each arm from its checkpoint in /tmp/train_ARM (a later call while the machine is warm);
# TRAIN_ARGS="--warmup 30" adds coda-train options to every arm (later ones win); INIT_WEIGHTS=FILE starts from that
# file instead of the shipped one (a fresh machine that lost the checkpoint: the optimiser starts again).
set -euo pipefail
budget=${1:?seconds of training}
out=${2:?folder for the weights and logs}
shift 2
arms=("${@:-facts}")
weights=${INIT_WEIGHTS:-src/coda_gqa_l/weights/smollm2-135m-instruct-coda.safetensors}
routing() {  # the starting file's thresholds: it starts in phase 2, and coda-train checks they match
  python -c "import sys; sys.path.insert(0, 'src')
from coda_gqa_l.models.weights import read_coda_meta
b = read_coda_meta('$weights')['convert']['bounded']
print(' '.join(f'{k}={b[k]}' for k in ('tau_exact', 'novelty', 'match', 'max_inserts')))"
}
read -r -a R <<< "$(routing)"
common=(--init-weights "$weights" --routing "${R[@]}" --phase2-steps 2000 --retrieval-fraction 0.2
  --lr 5e-4 --gate-lr 5e-3 --warmup 5 --save-every 10 --time-budget "$budget")
many=(--fact-fraction 0.6 --fact-counts 1 2 3 4 5 6 8 10 --gate-keep 0.8)
python -c "from coda_gqa_l.models.loader import load_smollm2; load_smollm2(progress=False)"  # export once
for arm in "${arms[@]}"; do
  case $arm in
    facts) extra=(--fact-fraction 0.5 --phase2-seq-len 2048 --batch-size 8) ;;
    recurring) extra=(--fact-fraction 0.5 --phase2-seq-len 2048 --batch-size 8 --recurring-keep) ;;
    multi4096) extra=("${many[@]}" --phase2-seq-len 4096 --batch-size 8) ;;
    multi2048) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16) ;;
    distill) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --distill-weight 1) ;;
    refuse) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --gate-refuse violations) ;;
    refuse_distill) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --gate-refuse violations
      --distill-weight 1) ;;
    refuse_vf10) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --gate-refuse violations
      --value-first-share 0.1) ;;
    distill_vf0) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --distill-weight 1
      --value-first-share 0) ;;
    distill_vf05) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --distill-weight 1
      --value-first-share 0.05) ;;
    distill_vf05_after) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --distill-weight 1
      --value-first-share 0.05 --value-first-keep after) ;;
    distill_vf20_after) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --distill-weight 1
      --value-first-share 0.2 --value-first-keep after) ;;
    distill_vf05_4096) extra=("${many[@]}" --phase2-seq-len 4096 --batch-size 8 --distill-weight 1
      --value-first-share 0.05) ;;
    distill_lowlr) extra=("${many[@]}" --phase2-seq-len 2048 --batch-size 16 --distill-weight 1 --lr 2e-4) ;;
    *) echo "unknown arm $arm" >&2; exit 2 ;;
  esac
  if [ "${RESUME:-0}" = 1 ]; then extra+=(--resume); fi
  read -r -a more <<< "${TRAIN_ARGS:-}"
  extra+=("${more[@]}")
  python -m coda_gqa_l.training.cli "${common[@]}" "${extra[@]}" --out "/tmp/train_$arm" >> "/tmp/train_$arm.log" 2>&1 &
done
wait || true
mkdir -p "$out"
for arm in "${arms[@]}"; do  # what there is, also when an arm failed: its log says why
  cp "/tmp/train_$arm/coda.safetensors" "$out/coda_$arm.safetensors" || echo "arm $arm: no weights" >&2
  cp "/tmp/train_$arm/log.jsonl" "$out/train_$arm.jsonl" || true
  tail -c 3000 "/tmp/train_$arm.log" | tr '\r' '\n' | tail -6 | tee "$out/train_$arm.tail"
done
