#!/usr/bin/env bash
# On the GPU machine (after `source scripts/device_setup.sh`): the whole-model CUDA-graph decode (issue 19), in three
# parts that each fit a short call, so a lost machine loses one part (2026-12-04: a call doing all three was lost
# with nothing back):
#   tests        the GPU tests of graph decode, generate() with bounded_decoding, the neural database's graph-decoded
#                answers, the tuned kernels' disk cache, and no host synchronisation in a fused read and decode
#                (about 2 minutes)
#   bench [S]    the model benchmark: bounded, bounded-graph, bounded-generate, the original's compiled StaticCache
#                through generate (static) and in the same tight loop as ours (static-loop), 8K/32K/128K, S seconds
#                (default 300)
#   demo         the demo on CUDA twice (the second process finds the autotuning timings on disk)
#   profile      where one 1,024-token ingest chunk's time goes after 8K and 32K tokens, bounded against the original:
#                kernel families, launches, host synchronisations (benchmarks/profile_ingest.py; about 3 minutes)
# Results: $OUT/graph_PART.tgz; the tables are printed last.
# Usage: bash scripts/device_graph_decode.sh tests|bench [SECONDS]|demo|profile
set -uo pipefail
part=${1:?tests, bench, demo or profile}
results=/tmp/graph_$part
mkdir -p "$results"
case $part in
  tests)
    python -m pytest -q -m gpu tests/models/test_graph_decode.py tests/models/test_graph_prefill.py tests/models/test_generation.py \
      tests/neuraldb/test_engine.py tests/test_decode.py tests/kernels/test_diff_attention.py tests/kernels/test_residual_norm.py \
      tests/kernels/test_window_step.py tests/kernels/test_window_chunk.py tests/kernels/test_segment_extras.py tests/kernels/test_step_inputs.py tests/kernels/test_gated_activation.py tests/models/test_inference_fold.py \
      tests/test_no_host_sync.py > "$results/gpu_tests.txt" 2>&1
    tail -n 15 "$results/gpu_tests.txt" ;;
  bench)
    python benchmarks/model_generate.py --contexts 8192 32768 131072 \
      --methods bounded bounded-graph bounded-generate static static-loop \
      --time-budget "${2:-300}" --out "$results/model_generate.json" > "$results/model_generate.txt" 2>&1
    tail -n 20 "$results/model_generate.txt" ;;
  demo)
    for run in first second; do
      python -m coda_gqa_l.neuraldb.cli demo --fresh --device cuda > "$results/demo_cuda_$run.txt" 2>&1
      echo "demo ($run process): $(tail -n 3 "$results/demo_cuda_$run.txt" | tr '\n' ' ')"
    done ;;
  profile)
    for context in 8192 32768; do
      python benchmarks/profile_ingest.py --context "$context" --out "$results/ctx$context" \
        > "$results/profile_ingest_$context.txt" 2>&1
      head -n 16 "$results/profile_ingest_$context.txt"
    done ;;
  *) echo "unknown part $part: tests, bench, demo or profile" >&2; exit 2 ;;
esac
tar czf "$OUT/graph_$part.tgz" -C /tmp "graph_$part"
