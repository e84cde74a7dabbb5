#!/usr/bin/env bash
# On the GPU machine (after `source scripts/device_setup.sh`): the whole-model CUDA-graph decode (issue 19) in one
# call. The GPU tests of graph decode, the neural database's answers and the tuned kernels' disk cache; the model
# benchmark (bounded, bounded-graph and transformers' compiled static cache at 8K/32K/128K); the demo on CUDA twice
# (the second process finds the autotuning timings on disk). Results: $OUT/graph.tgz; the tables are printed last.
# Usage: bash scripts/device_graph_decode.sh [SECONDS for the benchmark, default 300]
set -uo pipefail
budget=${1:-300}
results=/tmp/graph
mkdir -p "$results"
python -m pytest -q -m gpu tests/models/test_graph_decode.py tests/neuraldb/test_engine.py tests/test_decode.py \
  tests/kernels/test_diff_attention.py > "$results/gpu_tests.txt" 2>&1
python benchmarks/model_generate.py --contexts 8192 32768 131072 --methods bounded bounded-graph bounded-generate static static-loop \
  --time-budget "$budget" --out "$results/model_generate.json" > "$results/model_generate.txt" 2>&1
for run in first second; do
  python -m coda_gqa_l.neuraldb.cli demo --fresh --device cuda > "$results/demo_cuda_$run.txt" 2>&1
done
tar czf "$OUT/graph.tgz" -C /tmp graph
tail -n 3 "$results/gpu_tests.txt"
tail -n 12 "$results/model_generate.txt"
for run in first second; do echo "demo ($run process): $(tail -n 3 "$results/demo_cuda_$run.txt" | tr '\n' ' ')"; done
