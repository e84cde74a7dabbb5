#!/usr/bin/env bash
# On this (CPU) machine, before GPU calls: everything the GPU machine lacks, in git-ignored folders a call can carry
# (64 MiB each): .gguf_a/ and .gguf_b/ (the packaged SmolLM2 GGUF in two parts, scripts/split_gguf.sh) and .device/
# (wheels the GPU machine has not got: faker, platformdirs, gguf; the cleaned corpora, the Bible's too, as gzipped
# JSON lines).
# Then: call 1 carries .gguf_a and runs `cp .gguf_a/* /tmp/`; every later call, while the machine is warm, carries
# .gguf_b and .device and starts with `source scripts/device_setup.sh`. Usage: bash scripts/prepare_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '.device/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '.device/' >> .git/info/exclude; }
bash scripts/split_gguf.sh
rm -rf .device && mkdir -p .device/whl .device/corpora
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python -m pip download --quiet --no-deps --only-binary=:all: -d .device/whl \
  "faker==$(version faker)" "platformdirs==$(version platformdirs)"
cp .gguf_b/gguf-*.whl .device/whl/
python -c "from coda_gqa_l.data import load_bible, load_essays, load_wikipedia; load_wikipedia('all'); load_essays('all'); load_bible()"
cache=$(python -c "from coda_gqa_l.fetch import cache_dir; print(cache_dir())")
for name in wikipedia essays bible-kjv; do  # gzipped: with .gguf_b and the tree a call stays under 64 MiB
  gzip -9 -c "$cache/corpora/$name.jsonl" > ".device/corpora/$name.jsonl.gz"
done
du -sh .gguf_a .gguf_b .device
