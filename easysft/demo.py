"""`make demo`: teach the bundled SmolLM2-135M-Instruct a skill it lacks -- reversing the order of words -- on CPU.

Steps: generate a deterministic word-reversal dataset (train rows and held-out eval rows whose word sequences never
appear in training) and fine-tune with ``easysft.train``; its evals (step 0 = the base model, every third of the run,
the end) measure eval perplexity and greedy exact match on the held-out prompts (``--eval_generate``). Prints
before/after and three sample generations. Everything runs offline.

    python -m easysft.demo [--max_steps 84] [--output_dir demo-output] [--num_eval 50]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

WORDS = (
    "apple river stone cloud green table music light happy window garden yellow silver paper orange winter "
    "summer basket candle forest island mirror pencil rocket violin bottle camera dragon friend guitar hammer "
    "jacket kitten ladder magnet needle ocean pepper rabbit saddle ticket umbrella wagon zebra anchor butter "
    "castle desert engine feather glove honey igloo jungle kettle lemon meadow noodle parrot queen ribbon "
    "shadow tiger velvet walnut button cactus dolphin eagle falcon giraffe harbor iron jelly koala lantern"
).split()
TASK = "Reverse the order of these words: "


def make_rows(num_rows: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    """Rows of 3-5 distinct words; ``exclude`` holds word sequences already used (keeps eval held out)."""
    rows = []
    while len(rows) < num_rows:
        words = rng.sample(WORDS, rng.randint(3, 5))
        key = " ".join(words)
        if key in exclude:
            continue
        exclude.add(key)
        rows.append({"prompt": TASK + key, "answer": " ".join(reversed(words))})
    return rows


def write_dataset(folder: Path, num_train: int = 2000, num_eval: int = 50, seed: int = 0) -> Path:
    """train.json / eval.json in the original design's format; eval sequences never occur in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    eval_rows = make_rows(num_eval, rng, seen)
    train_rows = make_rows(num_train, rng, seen)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(train_rows, indent=1), encoding="utf-8")
    (folder / "eval.json").write_text(json.dumps(eval_rows, indent=1), encoding="utf-8")
    return folder


def demo_configs(out: Path, data_dir: Path, *, max_steps: int, learning_rate: float, row_tokens: int,
                 num_eval: int, eval_steps: int | None = None):
    """The demo's training run: packed rows, cosine schedule, an eval (perplexity + greedy generation of the
    held-out rows, scored) at step 0, every third of the run and the end. The generation settings it measures
    with (the model's own greedy defaults, at most 24 new tokens) are saved in easysft.json, so `easysft infer`
    on the model with no generation flag reproduces the demo's exact match."""
    from easysft.config import DataConfig, GenerateConfig, ModelConfig, TrainConfig

    return (
        ModelConfig(model_name_or_path="bundled"),
        DataConfig(data_path=[str(data_dir)], max_prompt_len=64, max_ans_len=32),
        # Packed rows of ~16 samples (~22 tokens each): no padding, the LM head only on answer tokens.
        TrainConfig(output_dir=str(out / "model"), overwrite_output_dir=True, per_device_train_batch_size=8,
                    packing=True, packing_max_tokens=row_tokens, max_steps=max_steps, learning_rate=learning_rate,
                    lr_scheduler_type="cosine", num_warmup_steps=max(1, max_steps // 20),
                    eval_steps=eval_steps or max(1, max_steps // 3), seed=1234, tensorboard=False,
                    eval_generate=num_eval, per_device_eval_batch_size=25),
        None,
        GenerateConfig(max_new_tokens=24),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easysft.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo-output")
    parser.add_argument("--max_steps", type=int, default=84)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--num_eval", type=int, default=50)
    parser.add_argument("--row_tokens", type=int, default=384, help="tokens per packed row (one row per step)")
    args = parser.parse_args(argv)

    from easysft.metrics import read_metrics
    from easysft.training.loop import train

    out = Path(args.output_dir)
    data_dir = write_dataset(out / "data", num_eval=args.num_eval)
    eval_rows = json.loads((data_dir / "eval.json").read_text(encoding="utf-8"))
    print("== easysft demo: teach SmolLM2-135M-Instruct to reverse word order ==", flush=True)
    print(f"data: {data_dir} (held-out eval rows: {len(eval_rows)})", flush=True)

    started = time.perf_counter()
    train(*demo_configs(out, data_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
                        row_tokens=args.row_tokens, num_eval=len(eval_rows)))
    train_seconds = time.perf_counter() - started

    # The eval records of the run: step 0 is the base model, the last one the fine-tuned model.
    evals = [r for r in read_metrics(out / "model" / "metrics.jsonl") if "eval_loss" in r]
    before, after = evals[0], evals[-1]
    print(f"before: eval perplexity {before['eval_ppl']:.3f}, held-out exact match {before['eval_exact_match']:.0%}")
    print(f"after:  eval perplexity {after['eval_ppl']:.3f}, held-out exact match {after['eval_exact_match']:.0%} "
          f"(training and evals took {train_seconds:.0f}s)")
    predictions = out / "model" / "eval_predictions" / f"step-{after['step']}.jsonl"
    for line in predictions.read_text(encoding="utf-8").splitlines()[:3]:
        row = json.loads(line)
        mark = "ok" if row["prediction"] == row["reference"] else "MISS"
        print(f"  [{mark}] {row['prompt']!r} -> {row['prediction']!r} (expected {row['reference']!r})")
    summary = {"before": {"eval_ppl": before["eval_ppl"], "exact_match": before["eval_exact_match"]},
               "after": {"eval_ppl": after["eval_ppl"], "exact_match": after["eval_exact_match"],
                         "rouge_l": after["eval_rouge_l"], "chrf": after["eval_chrf"]},
               "train_seconds": train_seconds, "max_steps": args.max_steps}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"model: {out / 'model'}  summary: {out / 'demo_summary.json'}  predictions: {predictions.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
