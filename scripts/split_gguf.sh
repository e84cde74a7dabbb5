#!/usr/bin/env bash
# Split the packaged SmolLM2 GGUF (98 MB) into two parts of at most 48 MiB in the git-ignored folders
# .gguf_a/ and .gguf_b/, plus the gguf wheel in .gguf_b/, for the GPU machine's 64 MiB per call (docs/models_and_data.md).
# Then: call 1 carries .gguf_a and runs `cp .gguf_a/* /tmp/`; call 2, at once, carries .gguf_b and runs
# `cp .gguf_b/* /tmp/ && bash scripts/join_gguf.sh && ...`. Usage: bash scripts/split_gguf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$(PYTHONPATH=src python -c 'from coda_gqa_l.models.loader import smollm2_gguf; print(smollm2_gguf())')
name=$(basename "$gguf")
part=$((48 * 1024 * 1024))
rm -rf .gguf_a .gguf_b && mkdir .gguf_a .gguf_b
head -c "$part" "$gguf" > ".gguf_a/$name.part-a"
tail -c "+$((part + 1))" "$gguf" > ".gguf_b/$name.part-b"
python -m pip download --quiet --no-deps --only-binary=:all: \
  "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')" -d .gguf_b
ls -l .gguf_a .gguf_b
