# Sourced by bench/gpu_check.sh and bench/gpu_memory_check.sh on the lent GPU machine (bash): installs the wheels
# bench/prepare_gpu_carry.sh put in .gpu-carry/ into /tmp/site (no dependency resolution: the machine has the
# rest), puts them ahead of the machine's own packages on PYTHONPATH (its transformers 5.17 is below easysft's
# bound), and makes the carried SmolLM2 tokenizer the bundled one (that machine has no gguf to extract it).
# Run from the repository root. OUT: where results go (the device tool sets it; default ./gpu-check-out); PY: the
# Python that has torch (python3 there). Failures are appended to $OUT/summary.txt.
OUT=${OUT:-$PWD/gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SITE=/tmp/site
if [ -d .gpu-carry/wheels ] && [ ! -d "$SITE/transformers" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpu-carry/wheels/*.whl > "$OUT/pip.log" 2>&1 || echo "installing .gpu-carry/wheels failed (see pip.log)" | tee -a "$OUT/summary.txt"
fi
export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
if [ -d .gpu-carry/tokenizer ]; then
  export EASYSFT_BENCH_TOKENIZER=$PWD/.gpu-carry/tokenizer
  # The tests' tokenizer fixture reads the bundled tokenizer from easysft's cache: put the carried one there.
  CACHE_TOK=$($PY -c "from easysft.models.bundled import cache_root, CHECKPOINT_NAME; print(cache_root() / 'models' / (CHECKPOINT_NAME + '-tokenizer'))")
  mkdir -p "$CACHE_TOK" && cp -r .gpu-carry/tokenizer/. "$CACHE_TOK/"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" > "$OUT/versions.txt" 2>&1
{ echo "the machine's own:"; $PY -m pip list 2>/dev/null | grep -i -E "^(datasets|trl|bitsandbytes|torchao|peft|accelerate|pyarrow|tokenizers|huggingface)"; } >> "$OUT/versions.txt"
{ echo "carried into $SITE:"; $PY -m pip list --path "$SITE" 2>/dev/null; } >> "$OUT/versions.txt"
