# Sourced on the GPU machine at the start of a call (scripts/prepare_device.sh says how the files get there):
# joins the model, installs the missing wheels to /tmp/site, puts the corpora in the cache, exports the model once.
cp .gguf_b/* /tmp/ 2>/dev/null || true
[ -d /tmp/site/faker ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:src CODA_GQA_L_CACHE=$HOME/.cache/coda-gqa-l
bash scripts/join_gguf.sh >/dev/null
mkdir -p "$CODA_GQA_L_CACHE/corpora"
for corpus in .device/corpora/*.jsonl.gz; do gunzip -c "$corpus" > "$CODA_GQA_L_CACHE/corpora/$(basename "$corpus" .gz)"; done
python -c "from coda_gqa_l.models.loader import load_smollm2; load_smollm2(progress=False)"
