#!/usr/bin/env bash
# On the GPU machine: join the GGUF parts made by split_gguf.sh (copied to /tmp, or the folder given) into
# the loader's cache, where load_smollm2() finds it, and check its SHA-256. If gguf is not importable,
# install the carried wheel to /tmp/gguf-lib (add it to PYTHONPATH). Usage: bash scripts/join_gguf.sh [/tmp]
set -euo pipefail
parts=${1:-/tmp}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # SMOLLM2_135M in models/loader.py
out="${CODA_GQA_L_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coda-gqa-l}/gguf/$name"
mkdir -p "$(dirname "$out")"
cat "$parts/$name.part-a" "$parts/$name.part-b" > "$out.tmp"
if [ "$(sha256sum "$out.tmp" | cut -d' ' -f1)" != "$sha256" ]; then
  rm -f "$out.tmp"
  echo "joined GGUF has the wrong SHA-256 (expected $sha256): copy both parts from the same split" >&2
  exit 1
fi
mv "$out.tmp" "$out"
if ! python -c 'import gguf' 2>/dev/null; then
  python -m pip install --quiet --no-deps --target /tmp/gguf-lib "$parts"/gguf-*.whl
  echo "installed gguf: export PYTHONPATH=/tmp/gguf-lib:\$PYTHONPATH"
fi
echo "$out"
