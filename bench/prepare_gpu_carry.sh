#!/usr/bin/env bash
# Fill .gpu-carry/ for bench/gpu_check.sh and `bench.bench_memory --gpu` on the lent GPU machine (device tool;
# /work/.library/device/KINDS.md lists what it has: Python 3.12, torch 2.11+cu130, transformers 5.17, peft,
# accelerate, pyarrow, pandas, xxhash, pytest; no datasets, trl, bitsandbytes or torchao, and no network).
#
# What it carries (~27 MB; a device call carries at most 64 MiB with the repository):
# - the bundled SmolLM2 tokenizer (extracted from the local bundled model: the GPU machine has no gguf);
# - wheels for CPython 3.12 on x86-64 Linux, dependencies not resolved (the machine has the rest): transformers
#   5.24 (easysft's lower bound; the machine's 5.17 is below it), trl 1.16, datasets 5.2 + dill + multiprocess,
#   torchao 0.18 and bitsandbytes 0.50.2 with only its CPU and CUDA 13.0 libraries kept (the machine's torch is
#   cu130; the full wheel's eight other CUDA/ROCm builds are 39 MB and would not fit).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/main/.venv/bin/python}
rm -rf .gpu-carry && mkdir -p .gpu-carry/wheels .gpu-carry/tokenizer
TOK=$(PYTHONPATH=$PWD $PY -c "from easysft.models.bundled import bundled_tokenizer_dir; print(bundled_tokenizer_dir())")
for name in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  [ -f "$TOK/$name" ] && cp "$TOK/$name" .gpu-carry/tokenizer/
done
PLATFORMS=""
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS="$PLATFORMS --platform $tag"; done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d .gpu-carry/wheels "transformers==5.24.0" "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" \
  "multiprocess==0.70.19" "torchao==0.18.0" "bitsandbytes==0.50.2"
BNB=$(ls .gpu-carry/wheels/bitsandbytes-*.whl)
zip -q -d "$BNB" 'bitsandbytes/libbitsandbytes_cuda11*' 'bitsandbytes/libbitsandbytes_cuda12*' \
  'bitsandbytes/libbitsandbytes_cuda132.so' 'bitsandbytes/libbitsandbytes_rocm*'
du -sh .gpu-carry
