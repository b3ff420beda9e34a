"""Data at scale: `easysft prepare` memory and speed against the number of rows, and training RSS on a big cache.

Generated prompt/answer JSON Lines (prompts 5-120 words, answers 3-60 words, seeded), prepared with the bundled
tokenizer by `easysft prepare` in a subprocess (a fresh cache each time). Measured:

1. peak RSS and wall of `prepare --num_proc 1` at ``--small`` and ``--large`` rows (bounded memory: the large
   peak should stay within 1.2x of the small one and under 1.5 GB);
2. rows/s of `prepare --num_proc 1` vs `--num_proc 2` on ``--speed_rows`` rows, and whether the two caches are
   byte-identical (the ratio needs a quiet machine with 2 free cores; the load average is recorded);
3. peak RSS of a short `easysft train` (a tiny random 2-layer Llama, a few steps) on a cache of ``--train_small``
   rows vs ``--large`` rows (memory-mapped samples: the difference should stay under 150 MB).

Peak RSS: the main `easysft` process's own high-water mark (``VmHWM``, recorded by :mod:`bench.high_water`; not
``ru_maxrss``, which a child inherits from this larger parent), and for ``--num_proc 2`` also the sum of the tree's
RSS sampled every 50 ms (forked workers share pages, so the sum over-counts).

    python -m bench.bench_data                      # 100k / 1M rows, speed on 200k
    python -m bench.bench_data --small 2000 --large 20000 --speed_rows 20000 --train_small 1000   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.data import WORDS

RESULTS = Path(__file__).parent / "results"


def write_rows(path: Path, count: int, seed: int = 0) -> None:
    """``count`` JSON Lines rows like the issue's table: prompts 5-120 words, answers 3-60 words."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 120)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(3, 60)))
            handle.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")


def _env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(args: list[str]) -> dict:
    """Run ``python -m easysft ARGS``; wall seconds, peak RSS of the largest process and of the sampled tree."""
    started = time.perf_counter()
    peaks_file = Path(tempfile.mkdtemp(prefix="bench-data-peaks-")) / "peaks.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.high_water", str(peaks_file), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_tree, main_cpu = 0, 0.0
    done = threading.Event()

    def sample() -> None:
        import psutil

        nonlocal peak_tree, main_cpu
        while not done.is_set():
            peak_tree = max(peak_tree, _tree_rss(proc.pid))
            try:
                times = psutil.Process(proc.pid).cpu_times()
                main_cpu = times.user + times.system  # this process only, not its workers
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    output = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"easysft {' '.join(args)} failed ({proc.returncode}):\n{output[-3000:]}")
    peak = json.loads(peaks_file.read_text(encoding="utf-8"))["rss_high_water"]
    shutil.rmtree(peaks_file.parent, ignore_errors=True)
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak / 2**20,
            "peak_tree_rss_mb": peak_tree / 2**20, "output": output,
            # CPU seconds: the whole tree (workers are reaped by the main process) and the main process alone.
            "cpu_s": usage.ru_utime + usage.ru_stime, "main_cpu_s": main_cpu}


TRAIN_DATA_FLAGS = ["--eval_fraction", "0.001", "--max_prompt_len", "256", "--max_ans_len", "128"]


def prepare(data: Path, cache: Path, num_proc: int, model: str = "bundled") -> dict:
    """A measured `easysft prepare` into an empty ``cache`` (the flags a training run of :func:`train_rss` uses,
    so that run finds the entry)."""
    shutil.rmtree(cache, ignore_errors=True)
    result = run_measured(["prepare", "--model_name_or_path", model, "--data_path", str(data),
                           "--cache_dir", str(cache), "--num_proc", str(num_proc), *TRAIN_DATA_FLAGS])
    result["digest"] = cache_digest(cache)
    return result


def cache_digest(cache: Path) -> str:
    """sha256 over every file of the (single) entry, names included; report.json's cache part excluded."""
    digest = hashlib.sha256()
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for file in sorted(entries[0].iterdir()):
        digest.update(file.name.encode())
        if file.suffix == ".bin" or file.name == "report.json":
            with open(file, "rb") as handle:  # in blocks: a whole-file read would grow this process by the cache
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama with the bundled tokenizer, saved as a --model_name_or_path folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from easysft.models.bundled import bundled_tokenizer_dir
    from easysft.models.load import load_tokenizer

    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_rss(model: Path, data: Path, cache: Path, out: Path) -> dict:
    """A 3-step training run on the entry in ``cache`` (prepared first, not measured, when missing)."""
    if not cache.is_dir():
        run_measured(["prepare", "--model_name_or_path", str(model), "--data_path", str(data), "--cache_dir",
                      str(cache), *TRAIN_DATA_FLAGS])
    shutil.rmtree(out, ignore_errors=True)
    result = run_measured(["train", "--model_name_or_path", str(model), "--data_path", str(data),
                           "--cache_dir", str(cache), "--output_dir", str(out), "--max_steps", "3",
                           "--per_device_train_batch_size", "4", "--tensorboard", "false",
                           # Eval batches of one sample: the final eval's activations then do not grow with the
                           # eval split (0.1% of the rows), so the difference measures the training data only.
                           "--per_device_eval_batch_size", "1", *TRAIN_DATA_FLAGS])
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    if not report.get("cache", {}).get("hit"):
        raise RuntimeError("the measured training run prepared its data instead of finding the cache")
    return result


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100_000, help="rows of the small prepare run")
    parser.add_argument("--large", type=int, default=1_000_000, help="rows of the large prepare and train runs")
    parser.add_argument("--speed_rows", type=int, default=200_000, help="rows of the --num_proc 1 vs 2 runs")
    parser.add_argument("--train_small", type=int, default=10_000, help="rows of the small training cache")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--out", default=str(RESULTS / "data"), help="results prefix (.md and .json)")
    parser.add_argument("--redo", default="",
                        help="comma list of memory, speed, training: re-run only those parts, reusing --work (its "
                             "row files, caches and tiny model) and the other parts' results in --out")
    parser.add_argument("--train_only", action="store_true", help="the same as --redo training")
    parser.add_argument("--note", default="", help="how quiet the machine was (written next to the results)")
    args = parser.parse_args(argv)
    redo = {part for part in (args.redo.split(",") if args.redo else []) if part}
    if args.train_only:
        redo.add("training")
    unknown = redo - set(PARTS)
    if unknown:
        parser.error(f"--redo: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if redo and not (args.work and (Path(args.work) / "tiny-llama").is_dir()):
        parser.error("--redo needs --work: the folder of an earlier full run (with its row files and tiny-llama)")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    if redo:
        results = json.loads(Path(args.out).with_suffix(".json").read_text(encoding="utf-8"))
        for part in ("rows", *PARTS):
            results[part] = {int(k): v for k, v in results.get(part, {}).items()}
        redone = f"{', '.join(sorted(redo))} re-run {time.strftime('%Y-%m-%d %H:%M')}"
        results["redone"] = f"{results['redone']}; {redone}" if results.get("redone") else redone
    else:
        results = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_before": load_average(), "rows": {}}
    if args.note:
        results["note"] = args.note
    try:
        files = {n: work / f"rows-{n}.jsonl" for n in {args.small, args.large, args.speed_rows, args.train_small}}
        if not redo:
            for n, path in sorted(files.items()):
                write_rows(path, n)
                results["rows"][n] = path.stat().st_size
            # Every run uses the tiny model's folder (the bundled tokenizer, saved): one tokenizer fingerprint, so
            # the training runs find the entries the memory runs prepared.
            tiny_model(work / "tiny-llama")
        run_parts(args, redo or set(PARTS), files, work, results)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write_results(results, args)
    return 0


PARTS = ("memory", "speed", "training")


def run_parts(args, parts: set[str], files: dict, work: Path, results: dict) -> None:
    """Run the measured ``parts`` in order, storing each in ``results``."""
    model = work / "tiny-llama"
    if "memory" in parts:
        memory = {}
        for n in (args.small, args.large):
            r = prepare(files[n], work / f"cache-{n}", 1, model=str(model))
            memory[n] = {k: r[k] for k in ("wall_s", "peak_rss_mb", "cpu_s")}
            print(f"prepare {n:>9,} rows --num_proc 1: {r['wall_s']:.1f} s, {n / r['wall_s']:,.0f} rows/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        results["memory"] = memory
    if "speed" in parts:
        speed = {}
        for num_proc in (1, 2):
            r = prepare(files[args.speed_rows], work / f"cache-np{num_proc}", num_proc, model=str(model))
            speed[num_proc] = {"wall_s": r["wall_s"], "rows_per_s": args.speed_rows / r["wall_s"],
                               "peak_rss_mb": r["peak_rss_mb"], "peak_tree_rss_mb": r["peak_tree_rss_mb"],
                               "cpu_s": r["cpu_s"], "main_cpu_s": r["main_cpu_s"], "digest": r["digest"]}
            print(f"prepare {args.speed_rows:>9,} rows --num_proc {num_proc}: {r['wall_s']:.1f} s, "
                  f"{speed[num_proc]['rows_per_s']:,.0f} rows/s, tree RSS {r['peak_tree_rss_mb']:.0f} MB", flush=True)
        results["speed"] = speed
        results["load_during_speed"] = load_average()
    if "training" in parts:
        training = {}
        for n in (args.train_small, args.large):
            # The tiny model carries the bundled tokenizer: the large run finds the entry prepared above.
            r = train_rss(model, files[n], work / f"cache-{n}", work / "out")
            training[n] = {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}
            print(f"train 3 steps on a {n:>9,}-row cache: peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        results["training"] = training
    results["load_after"] = load_average()


def write_results(results: dict, args) -> None:
    mem, speed, training = results["memory"], results["speed"], results["training"]
    small, large = mem[args.small], mem[args.large]
    ratio_mem = large["peak_rss_mb"] / small["peak_rss_mb"]
    ratio_speed = speed[2]["rows_per_s"] / speed[1]["rows_per_s"]
    identical = speed[1]["digest"] == speed[2]["digest"]
    train_delta = training[args.large]["peak_rss_mb"] - training[args.train_small]["peak_rss_mb"]
    # CPU-time bound projection for 2 free cores: the main process and the workers' share run side by side.
    projected = speed[1]["cpu_s"] / max(speed[2]["main_cpu_s"], speed[2]["cpu_s"] / 2)
    results["summary"] = {"peak_rss_large_over_small": ratio_mem, "speedup_num_proc_2": ratio_speed,
                          "projected_speedup_2_free_cores": projected, "byte_identical": identical,
                          "train_peak_rss_delta_mb": train_delta}
    lines = [
        "# Data at scale: `easysft prepare` memory and speed, training RSS on a large cache",
        "",
        f"Measured {results['date']} with `python -m bench.bench_data` on {os.cpu_count()} CPU cores"
        + (f" ({results['redone']})" if results.get("redone") else "") + ". "
        + (results.get("note") or "Conditions not stated: read the load averages.") + " Load average before: "
        f"{results['load_before']}; during the speed runs: {results['load_during_speed']}; after: "
        f"{results['load_after']}.",
        "Data: generated JSON Lines, prompts 5-120 words, answers 3-60 words (`bench/bench_data.py`), bundled "
        "SmolLM2 tokenizer, defaults otherwise; each prepare run starts from an empty cache. Training: 3 steps, "
        "batch 4, eval batch 1, a tiny random 2-layer Llama, on the entry prepared above (a cache hit).",
        "",
        "| run | rows | wall s | rows/s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, r in mem.items():
        lines.append(f"| prepare --num_proc 1 | {int(n):,} | {r['wall_s']:.1f} | {int(n) / r['wall_s']:,.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    for num_proc, r in speed.items():
        lines.append(f"| prepare --num_proc {num_proc} | {args.speed_rows:,} | {r['wall_s']:.1f} | "
                     f"{r['rows_per_s']:,.0f} | {r['peak_rss_mb']:.0f} (tree {r['peak_tree_rss_mb']:.0f}) |")
    for n, r in training.items():
        lines.append(f"| train 3 steps, tiny Llama, cache of | {int(n):,} | {r['wall_s']:.1f} | | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines += [
        "",
        "| check | target | measured |",
        "|---|---|---|",
        f"| peak RSS {args.large:,} rows / {args.small:,} rows | <= 1.2x, < 1,500 MB | {ratio_mem:.2f}x, "
        f"{large['peak_rss_mb']:.0f} MB |",
        f"| rows/s --num_proc 2 / --num_proc 1 | >= 1.7x (quiet machine, 2 free cores) | {ratio_speed:.2f}x |",
        f"| CPU seconds --num_proc 1 / --num_proc 2 (main + workers) | | {speed[1]['cpu_s']:.1f} / "
        f"{speed[2]['main_cpu_s']:.1f} + {speed[2]['cpu_s'] - speed[2]['main_cpu_s']:.1f} |",
        f"| projected speed-up on 2 free cores (CPU time / max(main, all / 2)) | >= 1.7x | {projected:.2f}x |",
        f"| caches of --num_proc 1 and 2 byte-identical | yes | {'yes' if identical else 'NO'} |",
        f"| training peak RSS, {args.large:,}-row cache - {args.train_small:,}-row cache | <= 150 MB | "
        f"{train_delta:+.0f} MB |",
        "",
        "Peak RSS: the main process's own high-water mark (`VmHWM`); for --num_proc 2 the tree figure sums every process's RSS "
        "sampled every 50 ms (forked workers share pages, so it over-counts). The --num_proc speed-up is "
        "depressed whenever other jobs hold the cores: the 1.7x target needs a quiet machine.",
    ]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
