"""LoRA vs full fine-tuning with ``easysft train`` on the bundled SmolLM2-135M: tokens/s and peak memory.

    python -m bench.bench_lora                 # 6 steps each (a couple of minutes on 2 CPU cores)
    python -m bench.bench_lora --steps 2       # a smoke run

Both runs use the same 64 generated prompt/answer rows (word reversal, :mod:`bench.data`), batch 8, fp32, the
same seed; LoRA is r=8, alpha 16 on q_proj,v_proj (the common recipe). Each run is its own ``easysft train``
process: peak memory is that process's ``ru_maxrss`` (from ``os.wait4``, so one run's peak never leaks into the
other's), tokens/s is real (non-padding) tokens over the summed step times from ``metrics.jsonl``, leaving out
step 1 (its first backward allocates the optimizer state and warms the kernels).

Prints a table and writes it to ``bench/results/lora.md``; never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import reversal_row

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "full": ["--learning_rate", "5e-5"],
    "lora r=8": ["--learning_rate", "2e-4", "--lora_dim", "8", "--lora_module_name", "q_proj,v_proj"],
}


def write_data(folder: Path, num_rows: int = 64) -> None:
    import random

    rng = random.Random(0)
    rows = [reversal_row(rng) for _ in range(num_rows + 8)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(rows[:num_rows]), encoding="utf-8")
    (folder / "eval.json").write_text(json.dumps(rows[num_rows:]), encoding="utf-8")


def run_one(mode: str, data_dir: Path, out_dir: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "easysft", "train", "--model_name_or_path", "bundled", "--data_path",
           str(data_dir), "--output_dir", str(out_dir), "--per_device_train_batch_size", "8", "--max_steps",
           str(steps), "--lr_scheduler_type", "constant", "--tensorboard", "false", "--seed", "1234", *MODES[mode]]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    process_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{output[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_ = [r for r in records if "tokens_per_s" in r]
    timed = steps_[1:] or steps_
    tokens = sum(r["total_tokens"] for r in timed)
    seconds = sum(r["total_tokens"] / r["tokens_per_s"] for r in timed)
    trainable = next((line for line in output.splitlines() if line.startswith("trainable parameters")), "")
    return {"mode": mode, "steps": len(steps_), "tokens_per_s": tokens / seconds, "step_s": seconds / len(timed),
            "peak_rss_mb": usage.ru_maxrss / 1024, "process_s": process_s,
            "final_loss": steps_[-1]["loss"], "trainable": trainable.removeprefix("trainable parameters: ")}


def table(results: list[dict]) -> str:
    lines = ["| mode | trainable parameters | tokens/s | s/step | peak RSS (MB) | whole process (s) | last loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['trainable']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['process_s']:.0f} | {r['final_loss']:.4f} |")
    full, lora = results[0], results[-1]
    lines.append("")
    lines.append(f"LoRA / full: {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x tokens/s, "
                 f"{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x peak memory.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        data_dir = Path(tmp) / "data"
        write_data(data_dir)
        results = [run_one(mode, data_dir, Path(tmp) / mode.split()[0], args.steps) for mode in MODES]
    header = (f"# LoRA vs full fine-tuning (easysft train, bundled SmolLM2-135M, fp32, batch 8, {args.steps} steps, "
              f"64 reversal rows)\n\n{os.cpu_count()} CPUs, {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}. The machine was shared with other jobs: absolute numbers are "
              "under contention, the ratio is what counts.\n\n")
    text = header + table(results) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
