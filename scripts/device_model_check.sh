#!/usr/bin/env bash
# On the GPU machine with the model (the second of the model pair of calls: scripts/device_setup.sh joins it).
#   bash scripts/device_model_check.sh check   the real-model GPU tests and model_generate.py at 8K / 32K / 128K
#   bash scripts/device_model_check.sh chunks  the database's read chunk: model_generate.py's bounded-graph ingest at
#                                              32K and 128K with --bounded-chunk 1024, 4096 and 8192 (CHUNKS=...)
# Logs and JSON under $OUT/model/; the tables are printed as they come.
set -uo pipefail
source scripts/device_setup.sh
export PYTHONUNBUFFERED=1
out=$OUT/model
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-check}" in
  check)
    timeout ${TEST_S:-200} python -m pytest -q -m gpu -p no:cacheprovider tests/models/test_graph_decode.py \
      tests/models/test_graph_prefill.py tests/models/test_generation.py tests/neuraldb/test_engine.py \
      > "$out/gpu_tests_model.txt" 2>&1
    echo "real-model GPU tests: $(tail -n 1 "$out/gpu_tests_model.txt")"
    grep -E "^(FAILED|ERROR)" "$out/gpu_tests_model.txt" | head -5
    timeout ${GENERATE_S:-300} python benchmarks/model_generate.py --contexts 8192 32768 131072 --warmup-tokens 32 \
      --new-tokens 64 --time-budget 200 --methods bounded-graph bounded-generate dynamic --out "$out" \
      > "$out/model_generate.txt" 2>&1
    tail -n 14 "$out/model_generate.txt"
    ;;
  chunks)
    for chunk in ${CHUNKS:-1024 4096 8192}; do
      timeout ${CHUNK_S:-150} python benchmarks/model_generate.py --contexts 32768 131072 --warmup-tokens 8 \
        --new-tokens 16 --time-budget 120 --methods bounded-graph dynamic --bounded-chunk "$chunk" \
        --out "$out/chunk_$chunk" > "$out/chunk_$chunk.txt" 2>&1
      echo "read chunk $chunk:"
      tail -n 6 "$out/chunk_$chunk.txt"
    done
    ;;
esac
