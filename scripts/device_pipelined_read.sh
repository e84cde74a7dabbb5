#!/usr/bin/env bash
# On the GPU machine, after `source scripts/device_setup.sh`: the pipelined graph read (dispatch.read_pieces) and
# the cuBLAS workspace, measured in one call. The GPU tests of the graph reads and decoders first, then
# benchmarks/model_generate.py with 1, 2, 4 and 8 pieces a read (DynamicCache beside the first: the baseline of the
# same run), then the 128K row again with a 4 MiB cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG=:4096:1): peak memory.
# Results: $OUT/pipelined_read/ as they come (a call that runs out of time still returns the finished parts); the
# tables printed last. PIECES="1 2 4" measures fewer piece counts (1 must stay: the baseline and the tokens compared).
set -uo pipefail
results=$OUT/pipelined_read
mkdir -p "$results"
# SKIP_TESTS=1: an earlier call ran the GPU tests (the first of the model pair, say); WORKSPACE_RUN=0 leaves out the
# 4 MiB workspace row
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 150 python -m pytest -q -m gpu tests/models/test_graph_prefill.py tests/models/test_graph_decode.py \
    > "$results/gpu_tests.txt" 2>&1
fi
run=(python benchmarks/model_generate.py --contexts 8192 32768 131072 --warmup-tokens 32 --new-tokens 64 --time-budget 100)
for pieces in ${PIECES:-1 2 4 8}; do
  methods=(bounded-graph)
  [ "$pieces" = 1 ] && methods+=(dynamic)
  CODA_GQA_L_READ_PIECES=$pieces timeout 120 "${run[@]}" --methods "${methods[@]}" --out "$results/pieces$pieces" \
    > "$results/pieces$pieces.txt" 2>&1
done
[ "${WORKSPACE_RUN:-1}" = 1 ] && CUBLAS_WORKSPACE_CONFIG=:4096:1 timeout 110 "${run[@]}" --contexts 131072 --methods bounded-graph \
  --out "$results/workspace_4m" > "$results/workspace_4m.txt" 2>&1
python - "$results" > "$results/same_tokens.txt" <<'PY'
import json, sys
rows = {}
for pieces in (1, 2, 4, 8):
    try:
        data = json.load(open(f"{sys.argv[1]}/pieces{pieces}/model_generate.json"))
    except OSError:
        continue
    for row in data["rows"]:
        if row["method"] == "bounded-graph" and "generated_ids" in row:
            rows[(pieces, row["context"])] = row["generated_ids"]
for (pieces, context), ids in sorted(rows.items()):
    base = rows.get((1, context))
    if pieces > 1 and base is not None:
        same = next((i for i, (a, b) in enumerate(zip(base, ids)) if a != b), len(ids))
        print(f"{pieces} pieces, {context} tokens: greedy tokens equal to one piece's for {same} of {len(ids)}")
PY
[ -f "$results/gpu_tests.txt" ] && tail -n 3 "$results/gpu_tests.txt"
cat "$results/same_tokens.txt"
for f in "$results"/pieces*.txt "$results/workspace_4m.txt"; do
  echo "== $(basename "$f")"
  grep -A4 "^method" "$f" | cut -c1-130
done
