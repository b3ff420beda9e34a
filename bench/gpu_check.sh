#!/usr/bin/env bash
# One-shot GPU check for issue 14 (about 8 minutes on one H200): the `gpu`-marked tests, then bench/bench_gpu.py.
# Everything it reports goes to $OUT (default ./gpu-check-out): nvidia-smi, versions, the test log, the bench log
# and gpu.md (also copied to bench/results/gpu.md). The 7 GB random-init model lives in a temporary folder,
# never in $OUT.
#
# The GPU machine has no datasets/trl/bitsandbytes/torchao and no network: first run bench/prepare_gpu_carry.sh
# here; it fills .gpu-carry/ (the SmolLM2 tokenizer and Python 3.12 wheels, ~26 MB). Then, on the device, with
# carry [".gpu-carry"]:  bash bench/gpu_check.sh   (bench/gpu_env.sh sets the machine up; the memory table of
# issue 18 is the next call: bash bench/gpu_memory_check.sh)
set -u
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # sets OUT and PY, then the machine up
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
