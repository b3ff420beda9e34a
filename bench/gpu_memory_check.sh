#!/usr/bin/env bash
# The memory table of issue 18 on the lent GPU machine (about 5 minutes on one H200; the second device call
# after bench/gpu_check.sh, same carry [".gpu-carry"]): `bench.bench_memory --gpu`, i.e. an 8B-shaped QLoRA run
# and a 1.7B full fine-tune with AdamW and with 8-bit AdamW, each easysft's estimate against the measured CUDA
# peak. Random-init models are written under /tmp/easysft-models (16 GB for the 8B one), never into $OUT.
set -u
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # sets OUT and PY, then the machine up
timeout 560 $PY -m bench.bench_memory --gpu --work_dir /tmp/easysft-models > "$OUT/bench_memory.log" 2>&1
echo "bench_memory exit $?" | tee -a "$OUT/summary.txt"
[ -f bench/results/memory-gpu.md ] && cp bench/results/memory-gpu.md "$OUT/memory-gpu.md"
cat "$OUT/summary.txt"
