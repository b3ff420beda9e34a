"""Peak memory of the memory levers (issue 18): easysft's estimate vs the measured peak, tokens/s, final loss.

    python -m bench.bench_memory --smoke       # CPU: bundled SmolLM2-135M, full / LoRA
    python -m bench.bench_memory --gpu         # one CUDA GPU: the issue's table (see GPU_MODES)

The CPU smoke leaves 8-bit AdamW on the full model out: with bitsandbytes' CPU optimizer, 2 steps on 134 M
parameters did not finish within 4 minutes on the shared development machine (a micro-test measured ~1 s per
300 k parameters per step there); its saving is the same arithmetic as on GPU (8 -> ~2 bytes per parameter).

Each run is its own ``easysft train`` process started through bench/high_water.py, which runs the CLI and then
writes the process's peaks as JSON: on CUDA ``torch.cuda.max_memory_allocated`` (what the estimate predicts, the
CUDA context excluded) and the reserved peak; on CPU the process's resident high-water mark since exec
(``VmHWM``). The estimate is
the ``memory estimate per device`` line the run printed before loading its weights. tokens/s leaves out step 1
(optimizer state allocation, warm-up).

GPU table (the issue's targets): a Llama-3.1-8B-shaped model (random init, bf16 on disk), 4,096-token packed
steps, QLoRA r=16 on all linear layers with gradient checkpointing: peak <= 10 GB; a SmolLM2-1.7B-shaped full
fine-tune with 8-bit AdamW vs AdamW, 30 steps: peak <= 0.75x at a final loss within 1%. Random-init models are
built here from their configs (no download) and saved once under ``--work_dir``.

Prints a markdown table and writes it to ``bench/results/memory[-gpu].md``; never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATE = re.compile(r"memory estimate per device \((\w+)\): ([0-9.]+) GiB peak")

SMOKE_MODES = {
    "full, adamw": ["--learning_rate", "5e-5"],
    "lora r=8": ["--learning_rate", "2e-4", "--lora_dim", "8", "--lora_module_name", "q_proj,v_proj"],
}
# Not in the CPU smoke: bitsandbytes' 4-bit CPU path trained the bundled model at 0.3 tokens/s here against 6 for
# fp32 LoRA (one step took over 10 minutes on the shared machine). Run it with --only qlora --qlora_on_cpu.
CPU_QLORA = {"qlora 4bit r=8": ["--learning_rate", "2e-4", "--lora_dim", "8", "--quantization", "4bit"]}
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
SMOLLM_17B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
GPU_ROWS = 1200  # training rows of the GPU runs (long list-question rows)
PACKED_4096 = ["--packing", "true", "--packing_max_tokens", "4096", "--max_prompt_len", "1024", "--dtype", "bf16"]
GPU_MODES = {
    # QLoRA's recipe: NF4 with double-quantized scales (~0.4 bit per weight less than plain NF4).
    "8B qlora 4bit+dq r=16 all-linear, ckpt": ("llama-8b", [*PACKED_4096, "--lora_dim", "16", "--quantization", "4bit",
                                                           "--double_quant", "true", "--gradient_checkpointing", "true",
                                                           "--learning_rate", "2e-4"]),
    "1.7B full, adamw": ("smollm-1.7b", [*PACKED_4096, "--learning_rate", "2e-5"]),
    "1.7B full, adamw_8bit": ("smollm-1.7b", [*PACKED_4096, "--learning_rate", "2e-5", "--optim", "adamw_8bit"]),
}


def write_data(folder: Path, num_rows: int, *, long_rows: bool) -> Path:
    import random

    from bench.data import list_question_row, reversal_row

    rng = random.Random(0)
    make = list_question_row if long_rows else reversal_row
    rows = [make(rng) for _ in range(num_rows + 8)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(rows[:num_rows]), encoding="utf-8")
    (folder / "eval.json").write_text(json.dumps(rows[num_rows:]), encoding="utf-8")
    return folder


def config_only_model(name: str, work_dir: Path) -> str:
    """A folder with just the config.json and tokenizer of a published shape: enough for easysft's estimate."""
    from transformers import LlamaConfig

    from easysft.models.bundled import bundled_tokenizer_dir
    from easysft.models.load import load_tokenizer

    folder = work_dir / f"{name}-config"
    tokenizer = load_tokenizer(os.environ.get("EASYSFT_BENCH_TOKENIZER") or str(bundled_tokenizer_dir()))
    shape = LLAMA_8B if name == "llama-8b" else SMOLLM_17B
    LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def estimate_gpu_modes(data_dir: Path, work_dir: Path, batch_size: int = 8) -> list[dict]:
    """What easysft's memory check prints for each GPU mode on one CUDA device, computed on any machine: the
    run's own flags and data through the same estimate, with nothing loaded and no GPU needed."""
    import torch

    from easysft.cli import parse_values
    from easysft.commands.train import build_configs
    from easysft.data.dataset import prepare_data
    from easysft.models.load import load_tokenizer
    from easysft.training.memory_check import estimate_run_memory

    rows = []
    for label, (model, extra) in GPU_MODES.items():
        folder = config_only_model(model, work_dir)
        values = parse_values("train", ["--model_name_or_path", folder, "--data_path", str(data_dir),
                                        "--per_device_train_batch_size", str(batch_size), *extra])
        model_cfg, data_cfg, train_cfg, lora_cfg, _ = build_configs(values)
        data = prepare_data(data_cfg, load_tokenizer(folder), seed=train_cfg.seed)
        estimate = estimate_run_memory(model_cfg, train_cfg, lora_cfg, folder, samples=data.train,
                                       engine_name="single", world_size=1, device=torch.device("cuda"))
        rows.append({"mode": label, "estimate_gib": estimate.total / 2**30,
                     "line": estimate.describe(torch.device("cuda"))})
    return rows


def random_model(name: str, work_dir: Path) -> str:
    """A random-init model of a published shape, saved once in bf16 with the bundled tokenizer."""
    folder = work_dir / name
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from easysft.models.bundled import bundled_tokenizer_dir
    from easysft.models.load import load_tokenizer

    tokenizer = load_tokenizer(os.environ.get("EASYSFT_BENCH_TOKENIZER") or str(bundled_tokenizer_dir()))
    shape = LLAMA_8B if name == "llama-8b" else SMOLLM_17B
    config = LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


def run_one(label: str, model: str, data_dir: Path, out_dir: Path, steps: int, extra: list[str],
            batch_size: int = 8) -> dict:
    """One ``easysft train`` process; its estimate line, measured peaks, tokens/s and last loss."""
    peaks_file = out_dir.parent / f".{out_dir.name}-peaks.json"
    cmd = [sys.executable, "-m", "bench.high_water", str(peaks_file), "train",
           "--model_name_or_path", model, "--data_path", str(data_dir), "--output_dir", str(out_dir),
           "--per_device_train_batch_size", str(batch_size), "--max_steps", str(steps), "--lr_scheduler_type",
           "constant", "--tensorboard", "false", "--seed", "1234", *extra]
    # The repository first, then whatever PYTHONPATH already holds (on the GPU machine: the carried wheels).
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label} run failed:\n{output[-3000:]}")
    found = ESTIMATE.search(output)
    peaks = json.loads(peaks_file.read_text())
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_ = [r for r in records if "tokens_per_s" in r]
    timed = steps_[1:] or steps_
    seconds = sum(r["total_tokens"] / r["tokens_per_s"] for r in timed)
    measured = (peaks["cuda_max_allocated"] if peaks.get("cuda_max_allocated")
                else peaks.get("rss_high_water") or usage.ru_maxrss * 1024)
    return {"mode": label, "estimate_gib": float(found.group(2)) if found else float("nan"),
            "peak_gib": measured / 2**30, "device": found.group(1) if found else "?",
            "reserved_gib": peaks.get("cuda_max_reserved", 0) / 2**30,
            "tokens_per_s": sum(r["total_tokens"] for r in timed) / max(seconds, 1e-9),
            "final_loss": steps_[-1]["loss"], "steps": len(steps_)}


def table(results: list[dict]) -> str:
    lines = ["| mode | device | estimate (GiB) | measured peak (GiB) | estimate / measured | tokens/s | last loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['device']} | {r['estimate_gib']:.2f} | {r['peak_gib']:.2f} | "
                     f"{r['estimate_gib'] / r['peak_gib']:.2f} | {r['tokens_per_s']:.0f} | {r['final_loss']:.4f} |")
    by_mode = {r["mode"]: r for r in results}
    pairs = [("full, adamw", "full, adamw_8bit"), ("1.7B full, adamw", "1.7B full, adamw_8bit")]
    for base, low in pairs:
        if base in by_mode and low in by_mode:
            a, b = by_mode[base], by_mode[low]
            lines.append(f"\n{low} / {base}: {b['peak_gib'] / a['peak_gib']:.2f}x peak, final loss "
                         f"{100 * (b['final_loss'] / a['final_loss'] - 1):+.2f}%.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU: the bundled model, a few steps.")
    parser.add_argument("--gpu", action="store_true", help="CUDA: the issue's 8B QLoRA and 1.7B 8-bit AdamW runs.")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (smoke 3, gpu 30)")
    parser.add_argument("--only", default=None, help="run only the modes whose label contains this")
    parser.add_argument("--qlora_on_cpu", action="store_true", help="add the (very slow) CPU QLoRA run to --smoke")
    parser.add_argument("--work_dir", default=None, help="where random-init GPU models are saved (reused)")
    parser.add_argument("--estimate_only", action="store_true",
                        help="with --gpu: print easysft's estimate of each GPU run (any machine; nothing is trained)")
    args = parser.parse_args(argv)
    if not (args.smoke or args.gpu):
        parser.error("pass --smoke (CPU) or --gpu")
    if args.estimate_only:
        if not args.gpu:
            parser.error("--estimate_only goes with --gpu")
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            data_dir = write_data(Path(tmp) / "data", GPU_ROWS, long_rows=True)
            for row in estimate_gpu_modes(data_dir, Path(tmp)):
                print(f"{row['mode']}: {row['line']}")
        return
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("bench_memory --gpu: no CUDA device here (the 8B-shaped run alone needs ~9 GiB of GPU memory); "
              "run it on a GPU machine, or add --estimate_only for easysft's estimates.")
        return
    steps = args.steps or (30 if args.gpu else 3)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(args.work_dir or tmp)
        data_dir = write_data(Path(tmp) / "data", GPU_ROWS if args.gpu else 64, long_rows=args.gpu)
        smoke = SMOKE_MODES | (CPU_QLORA if args.qlora_on_cpu else {})
        modes = GPU_MODES if args.gpu else {k: ("bundled", v) for k, v in smoke.items()}
        for i, (label, (model, extra)) in enumerate(modes.items()):
            if args.only and args.only not in label:
                continue
            model_path = model if model == "bundled" else random_model(model, work)
            results.append(run_one(label, model_path, data_dir, Path(tmp) / f"run{i}", steps, extra))
            print(table(results[-1:]), flush=True)
    where = "one CUDA GPU" if args.gpu else f"{os.cpu_count()} CPUs"
    header = (f"# Memory levers: estimate vs measured peak ({steps} steps per run)\n\n{where}, "
              f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}. CPU peaks are whole-process RSS; "
              "CUDA peaks are torch's max allocated. The machine may be shared: tokens/s are under contention.\n\n")
    text = header + table(results) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("memory-gpu.md" if args.gpu else "memory.md")).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
