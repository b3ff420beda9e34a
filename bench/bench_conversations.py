"""Conversations: `easysft prepare` against TRL's own dataset preparation (``assistant_only_loss``), side by side.

The same file of tool-calling conversations (:mod:`bench.tool_data`: tools as a JSON string, arguments as JSON
strings, as agent logs store them), the same bundled SmolLM2 tokenizer and the same rendering: easysft with
``--chat_template chatml_tools`` (masks from the template's own rendering), TRL 1.16 ``SFTTrainer`` with
``assistant_only_loss=True`` and ``bench/templates/chatml_tools_marked.jinja`` (the same text, with the
``{% generation %}`` markers TRL needs), both with 2 processes (``--num_proc 2`` / ``dataset_num_proc=2``). Each
side runs as its own process, timed whole from outside (imports, tokenizer, reading, tokenizing, writing); TRL's
side also builds a tiny random model, which its trainer needs (seconds at most). Equal work is checked: total
and supervised token counts of both sides, and the first 200 samples' ids and labels, must be identical.

    python -m bench.bench_conversations --rows 100000            # writes bench/results/conversations.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.tool_data import conversations

RESULTS = Path(__file__).parent / "results"
MARKED = Path(__file__).parent / "templates" / "chatml_tools_marked.jinja"
COMPARED = 200


def write_data(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in conversations(rows, seed=0):
            out.write(json.dumps({**row, "tools": json.dumps(row["tools"])}) + "\n")


def _env() -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def easysft_side(data: Path, work: Path, num_proc: int) -> dict:
    cache = work / "easysft-cache"
    wall = timed([sys.executable, "-m", "easysft", "prepare", "--data_path", str(data), "--template", "chat",
                  "--chat_template", "chatml_tools", "--max_seq_len", "100000", "--eval_fraction", "0",
                  "--num_proc", str(num_proc), "--cache_dir", str(cache), "--output_dir", str(work / "easysft")])
    report = json.loads((work / "easysft" / "data_report.json").read_text())
    from easysft.data.samples import SampleView

    entry = next(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    view = SampleView.open(str(entry), "train")
    return {"wall_s": wall, "samples": report["train"]["kept"], "tokens": report["train"]["num_tokens"],
            "supervised": report["train"]["num_supervised_tokens"],
            "first": [[s["input_ids"], s["labels"]] for s in view[:COMPARED]]}


def trl_side(data: Path, work: Path, num_proc: int) -> dict:
    out = work / "trl.json"
    wall = timed([sys.executable, "-m", "bench.bench_conversations", "--trl_worker", str(data), str(out),
                  "--num_proc", str(num_proc)])
    return {"wall_s": wall, **json.loads(out.read_text())}


def trl_worker(data: str, out: str, num_proc: int) -> None:
    """The TRL side, in its own process: SFTTrainer prepares the dataset in its constructor."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from trl import SFTConfig, SFTTrainer

    from easysft.models.bundled import bundled_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
    tokenizer.chat_template = MARKED.read_text(encoding="utf-8")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                                         intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=4, num_key_value_heads=2))
    dataset = load_dataset("json", data_files=data, split="train")
    with tempfile.TemporaryDirectory() as folder:
        args = SFTConfig(output_dir=folder, assistant_only_loss=True, dataset_num_proc=num_proc, max_length=None,
                         packing=False, report_to=[], use_cpu=True)
        prepared = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train_dataset
        # TRL turns its assistant masks into a labels column (-100 outside the assistant turns)
        ids, labels = prepared["input_ids"], prepared["labels"]
        first = [[list(row), list(label)] for row, label in zip(ids[:COMPARED], labels[:COMPARED], strict=True)]
        result = {"samples": len(ids), "tokens": sum(map(len, ids)),
                  "supervised": sum(sum(1 for t in label if t != -100) for label in labels), "first": first}
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "conversations"))
    parser.add_argument("--note", default="")
    parser.add_argument("--trl_worker", nargs=2, metavar=("DATA", "OUT"))
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(*args.trl_worker, args.num_proc)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-conversations-") as folder:
        work = Path(folder)
        data = work / "tools.jsonl"
        write_data(data, args.rows)
        load_before = os.getloadavg()
        ours = easysft_side(data, work, args.num_proc)
        theirs = trl_side(data, work, args.num_proc)
        load_after = os.getloadavg()
    same = ours["first"] == theirs["first"]
    equal = all(ours[k] == theirs[k] for k in ("samples", "tokens", "supervised"))
    ratio = theirs["wall_s"] / ours["wall_s"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": args.rows, "num_proc": args.num_proc,
              "cores": os.cpu_count(), "load_before": load_before, "load_after": load_after, "note": args.note,
              "easysft": {k: v for k, v in ours.items() if k != "first"},
              "trl": {k: v for k, v in theirs.items() if k != "first"},
              "speedup": ratio, "equal_counts": equal, f"first_{COMPARED}_identical": same}
    lines = [
        f"# Conversations: `easysft prepare` vs TRL `assistant_only_loss` preparation ({result['date']})", "",
        f"`python -m bench.bench_conversations --rows {args.rows}` on {os.cpu_count()} cores, {args.num_proc} "
        f"processes each side, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. "
        + (args.note or ""), "",
        "| tool | wall s | conversations/s | samples | tokens | supervised tokens |", "|---|---:|---:|---:|---:|---:|"]
    for name, side in (("easysft", ours), ("TRL 1.16", theirs)):
        lines.append(f"| {name} | {side['wall_s']:.1f} | {args.rows / side['wall_s']:,.0f} | {side['samples']:,} | "
                     f"{side['tokens']:,} | {side['supervised']:,} |")
    lines += ["", f"easysft / TRL speed: **{ratio:.2f}x** (target >= 1.5x); equal token counts: "
                  f"{'yes' if equal else 'NO'}; first {COMPARED} samples' ids and labels identical: "
                  f"{'yes' if same else 'NO'}."]
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
