"""`make demo`: teach the bundled SmolLM2-135M-Instruct a skill it lacks -- reversing the order of words -- on CPU.

Steps: generate a deterministic word-reversal dataset (train rows and held-out eval rows whose word sequences never
appear in training), measure the base model (eval perplexity, greedy exact match on held-out prompts), fine-tune
with ``easysft.train``, measure again, and print three sample generations. Everything runs offline.

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


def exact_match(model_path: str, rows: list[dict], *, batch_size: int = 25) -> tuple[float, list[str]]:
    """Greedy generations for ``rows`` with the template saved beside the model (qa for the base model)."""
    from easysft.config import GenerateConfig
    from easysft.data.templates import Template
    from easysft.generate import generate_ids
    from easysft.models.load import load_model_and_tokenizer

    model, tokenizer, resolved = load_model_and_tokenizer(model_path)
    model.eval()
    template = Template.from_dict(resolved.meta["template"]) if "template" in resolved.meta else Template.from_name("qa")
    prompts = [template.prompt_ids(tokenizer, row["prompt"]) for row in rows]
    greedy = GenerateConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=24)
    outputs = generate_ids(model, tokenizer, prompts, greedy, max_new_tokens=24, batch_size=batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
    hits = sum(text == row["answer"] for text, row in zip(texts, rows, strict=True))
    return hits / len(rows), texts


def perplexity(model_path: str, data_dir: Path) -> float:
    from easysft.config import DataConfig
    from easysft.data.dataset import prepare_data
    from easysft.evaluation import evaluate
    from easysft.models.load import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(model_path)
    data = prepare_data(DataConfig(data_path=[str(data_dir)]), tokenizer)
    return evaluate(model, data.eval, batch_size=25, pad_token_id=tokenizer.pad_token_id).perplexity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easysft.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo-output")
    parser.add_argument("--max_steps", type=int, default=84)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--num_eval", type=int, default=50)
    parser.add_argument("--row_tokens", type=int, default=384, help="tokens per packed row (one row per step)")
    args = parser.parse_args(argv)

    from easysft.config import DataConfig, ModelConfig, TrainConfig
    from easysft.models.bundled import bundled_checkpoint_dir
    from easysft.training.loop import train

    out = Path(args.output_dir)
    data_dir = write_dataset(out / "data", num_eval=args.num_eval)
    eval_rows = json.loads((data_dir / "eval.json").read_text(encoding="utf-8"))
    base = str(bundled_checkpoint_dir())
    print("== easysft demo: teach SmolLM2-135M-Instruct to reverse word order ==", flush=True)
    print(f"data: {data_dir} (held-out eval rows: {len(eval_rows)})", flush=True)

    base_ppl = perplexity(base, data_dir)
    base_em, _ = exact_match(base, eval_rows)
    print(f"before: eval perplexity {base_ppl:.3f}, held-out exact match {base_em:.0%}", flush=True)

    started = time.perf_counter()
    train(
        ModelConfig(model_name_or_path="bundled"),
        DataConfig(data_path=[str(data_dir)], max_prompt_len=64, max_ans_len=32),
        # Packed rows of ~16 samples (~22 tokens each): no padding, the LM head only on answer tokens.
        TrainConfig(output_dir=str(out / "model"), overwrite_output_dir=True, per_device_train_batch_size=8,
                    packing=True, packing_max_tokens=args.row_tokens, max_steps=args.max_steps, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
                    num_warmup_steps=max(1, args.max_steps // 20), eval_steps=max(1, args.max_steps // 3),
                    seed=1234, tensorboard=False),
    )
    train_seconds = time.perf_counter() - started

    tuned_ppl = perplexity(str(out / "model"), data_dir)
    tuned_em, texts = exact_match(str(out / "model"), eval_rows)
    print(f"after:  eval perplexity {tuned_ppl:.3f}, held-out exact match {tuned_em:.0%} "
          f"(training took {train_seconds:.0f}s)")
    for row, text in list(zip(eval_rows, texts, strict=True))[:3]:
        mark = "ok" if text == row["answer"] else "MISS"
        print(f"  [{mark}] {row['prompt']!r} -> {text!r} (expected {row['answer']!r})")
    summary = {"before": {"eval_ppl": base_ppl, "exact_match": base_em},
               "after": {"eval_ppl": tuned_ppl, "exact_match": tuned_em}, "train_seconds": train_seconds,
               "max_steps": args.max_steps}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"model: {out / 'model'}  summary: {out / 'demo_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
