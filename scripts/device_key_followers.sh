#!/usr/bin/env bash
# On the GPU machine (no model needed; the platformdirs wheel installed to /tmp/site): the routing kernel's key rows
# written by follower programs (CODA_GQA_L_KEY_FOLLOWERS), checked and timed against the keys written in the chains.
#   1. the routing GPU tests, followers bit for bit against the chains among them;
#   2. benchmarks/routing_kernel.py with the keys in the chains, by followers and nowhere (the bound);
#   3. the 7B layer's prefill and routing share, followers off then on, in one call;
#   4. the graph prefill, graph decode and no-host-sync GPU tests with followers on.
# Results under $OUT/key_followers/; the tables are printed last. Each part has its own time limit: a hung follower
# (it spins on its chain's count) fails its part, not the call.
set -uo pipefail
export PYTHONPATH=/tmp/site:src TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_followers}
out=$OUT/key_followers
mkdir -p "$out"
timeout 240 python -m pytest -q -m gpu tests/kernels/test_routing.py -p no:cacheprovider > "$out/routing_tests.txt" 2>&1
echo "routing tests: $(tail -n 1 "$out/routing_tests.txt")"
timeout 150 python benchmarks/routing_kernel.py --keys chain followers none --out "$out" > "$out/routing_kernel.txt" 2>&1
for on in 0 1; do
  CODA_GQA_L_KEY_FOLLOWERS=$on timeout 170 python benchmarks/run_suite.py --only prefill,routing --shapes 7B \
    --configs medium --deadline-s 120 --no-plots --out "$out/suite_$on" > "$out/suite_$on.txt" 2>&1
  echo "suite, followers $on:"; grep -E "^\| (prefill|routing):" "$out/suite_$on.txt" | head -4
  grep -A 6 "^### Prefill tokens/s" "$out/suite_$on.txt" | tail -n 3
done
CODA_GQA_L_KEY_FOLLOWERS=1 timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/models/test_graph_prefill.py \
  tests/test_no_host_sync.py tests/models/test_graph_decode.py > "$out/graph_tests_followers.txt" 2>&1
echo "graph tests with followers: $(tail -n 1 "$out/graph_tests_followers.txt")"
tail -n 12 "$out/routing_kernel.txt"
