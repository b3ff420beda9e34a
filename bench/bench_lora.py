"""LoRA vs full fine-tuning with ``easysft train`` on the bundled SmolLM2-135M: tokens/s and peak memory.

    python -m bench.bench_lora                 # 6 steps each (a couple of minutes on 2 CPU cores)
    python -m bench.bench_lora --steps 2       # a smoke run

Both runs use the same 64 generated prompt/answer rows (word reversal, :mod:`bench.data`), batch 8, fp32, the
same seed; LoRA is r=8, alpha 16 on q_proj,v_proj (the common recipe). Each run is its own ``easysft train``
process: peak memory is that process's ``ru_maxrss`` (from ``os.wait4``, so one run's peak never leaks into the
other's), tokens/s is real (non-padding) tokens over the summed step times from ``metrics.jsonl``, leaving out
step 1 (its first backward allocates the optimizer state and warms the kernels).

Prints a table and writes ``bench/results/lora.json`` (with the load average before and after) and the ``.md``
rendered from it; never pass/fail. The README's LoRA table comes from the training benchmark's run instead
(``bench/results/train.json``: the easysft full and LoRA rows, packed, same data).
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


def lora_table(payload: dict) -> str:
    """The results file's table and ratio line (rendered by :mod:`bench.readme_tables` too)."""
    meta, results = payload["meta"], payload["results"]
    load = meta["load_average"]
    lines = [f"easysft train, bundled SmolLM2-135M, fp32, batch 8, {meta['steps']} steps, 64 reversal rows, unpacked; "
             f"{meta['machine']}, {meta['date']}, load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} "
             f"after. {meta['note']} tokens/s leaves out step 1 (optimizer state allocation, warm-up).",
             "",
             "| mode | trainable parameters | tokens/s | s/step | peak RSS (MB) | whole process (s) | last loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['trainable']} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['process_s']:.0f} | {r['final_loss']:.4f} |")
    full, lora = results[0], results[-1]
    lines.append("")
    lines.append(f"LoRA / full: {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x tokens/s, "
                 f"{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x peak memory.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--note", default="The machine was shared with other jobs: absolute numbers are under "
                        "contention, the ratio is what counts.")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        data_dir = Path(tmp) / "data"
        write_data(data_dir)
        results = [run_one(mode, data_dir, Path(tmp) / mode.split()[0], args.steps) for mode in MODES]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}", "steps": args.steps, "note": args.note,
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())}}
    payload = {"meta": meta, "results": results}
    print(lora_table(payload))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    from bench.readme_tables import write_results_markdown

    print(f"wrote {write_results_markdown('lora')}")


if __name__ == "__main__":
    main()
