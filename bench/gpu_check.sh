#!/usr/bin/env bash
# One-shot GPU check for issue 14 (about 8 minutes on one H200): the `gpu`-marked tests, then bench/bench_gpu.py.
# Everything it reports goes to $OUT (default ./gpu-check-out): nvidia-smi, versions, the test log, the bench log
# and gpu.md (also copied to bench/results/gpu.md). The 7 GB random-init model lives in a temporary folder,
# never in $OUT.
#
# The GPU machine has no datasets/trl/bitsandbytes/torchao and no network: first run bench/prepare_gpu_carry.sh
# here; it fills .gpu-carry/ (the SmolLM2 tokenizer and Python 3.12 wheels, ~27 MB). Then, on the device, with
# carry [".gpu-carry"]:  bash bench/gpu_check.sh
# The wheels are unpacked into /tmp/site without dependency resolution (the machine has the rest), ahead of the
# machine's own packages on PYTHONPATH, so its transformers 5.17 is replaced by 5.24 for these processes only.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SITE=/tmp/site
if [ -d .gpu-carry/wheels ]; then
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
$PY -m pip list 2>/dev/null | grep -i -E "^(datasets|trl|bitsandbytes|torchao|peft|accelerate|pyarrow|tokenizers|huggingface)" >> "$OUT/versions.txt"
# Only the files that hold `gpu` tests: collecting the whole suite would import test modules whose packages
# (deepspeed, selenium, gguf) this machine does not have.
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider $(grep -rl "pytest.mark.gpu" tests) > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?" | tee -a "$OUT/summary.txt"
WORK=$(mktemp -d /tmp/easysft-bench-gpu-XXXX)
timeout 420 $PY -m bench.bench_gpu --work "$WORK" --results "$OUT/gpu.md" > "$OUT/bench_gpu.log" 2>&1
echo "bench_gpu exit $?" | tee -a "$OUT/summary.txt"
for name in trl easysft easysft-gc; do [ -f "$WORK/$name.log" ] && tail -c 20000 "$WORK/$name.log" > "$OUT/$name.log"; done
[ -f "$OUT/gpu.md" ] && cp "$OUT/gpu.md" bench/results/gpu.md
rm -rf "$WORK"
cat "$OUT/summary.txt"
