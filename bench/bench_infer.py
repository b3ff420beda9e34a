"""Inference benchmark: `easysft infer`'s batched path vs sequential per-prompt `transformers` generation.

    python -m bench.bench_infer                        # 24 prompts, 16 new tokens, batches of at most 24
    python -m bench.bench_infer --num_prompts 8 --max_new_tokens 8 --repeats 1    # a smoke run

Both sides run in ONE process on the same loaded model (the bundled SmolLM2-135M-Instruct, fp32) and the same
prompt ids (rendered with the model's template exactly as `easysft infer` renders them), with the same greedy
settings: ``do_sample=False`` and the original design's ``repetition_penalty=2.0``.

- sequential: ``model.generate`` on one unpadded prompt at a time (transformers' own repetition penalty);
- easysft: :func:`easysft.generate.generate_ids`, the function `easysft infer` calls: prompts sorted by length,
  the prompt pass in length buckets whose key/value caches are stitched into one left-padded decoding batch,
  padding-aware repetition penalty, each row stopping at its own EOS, input order restored.

A short warm-up runs first (one-off allocations and lazy initialisation are charged to neither side). Prints the
table, the speed ratio and whether every prompt got the identical tokens; writes it to ``bench/results/infer.md``.
Never pass/fail: on a machine shared with other jobs, absolute times move; the sides run interleaved and the fastest
run of each counts, so the ratio is what to read.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_prompts", type=int, default=24)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=24, help="easysft's per_device_eval_batch_size")
    parser.add_argument("--repetition_penalty", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per side, interleaved; the table reports the fastest and the median")
    parser.add_argument("--out", default=str(RESULTS / "infer.md"))
    return parser.parse_args(argv)


def sequential(model, tokenizer, prompts, max_new_tokens, repetition_penalty, stop_ids):
    """The baseline: plain transformers generate, one prompt at a time, no padding."""
    import torch

    from easysft.generate import cut_at_stop

    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition_penalty,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids,
            )
            outputs.append(cut_at_stop(out[0, len(ids):].tolist(), stop_ids))
    return outputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.data import make_rows
    from easysft.config import GenerateConfig
    from easysft.generate import build_prompt_ids, generate_ids, resolve_settings, stop_token_ids
    from easysft.models.load import load_model_and_tokenizer

    model, tokenizer, resolved = load_model_and_tokenizer("bundled")
    model.eval()
    settings = resolve_settings(resolved.meta, tokenizer, {})
    _, rows = make_rows(0, args.num_prompts, seed=0)
    prompts = [build_prompt_ids(tokenizer, settings.template, r["prompt"], None, settings.max_prompt_len)
               for r in rows]
    lengths = sorted(len(p) for p in prompts)
    gen = GenerateConfig(do_sample=False, repetition_penalty=args.repetition_penalty)
    stop_ids = stop_token_ids(model, tokenizer)

    # Warm-up: both code paths once on two short prompts.
    sequential(model, tokenizer, prompts[:2], 2, args.repetition_penalty, stop_ids)
    generate_ids(model, tokenizer, prompts[:2], gen, max_new_tokens=2, batch_size=2)

    load_before = os.getloadavg()[0]
    times_seq, times_batched = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows both sides alike
        start = time.perf_counter()
        reference = sequential(model, tokenizer, prompts, args.max_new_tokens, args.repetition_penalty, stop_ids)
        times_seq.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = generate_ids(model, tokenizer, prompts, gen, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
        times_batched.append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    seconds_seq, seconds_batched = min(times_seq), min(times_batched)
    median_ratio = statistics.median(times_seq) / statistics.median(times_batched)

    identical = batched == reference
    differing = sum(a != b for a, b in zip(batched, reference, strict=True))
    tokens = sum(map(len, reference))
    ratio = seconds_seq / seconds_batched
    lines = [
        "# Inference: easysft infer (batched) vs sequential transformers generate",
        "",
        f"Bundled SmolLM2-135M-Instruct, fp32, CPU ({os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}); {len(prompts)} prompts of {lengths[0]}-"
        f"{lengths[-1]} tokens (template '{settings.template.name}'), greedy, {args.max_new_tokens} new tokens max, "
        f"repetition_penalty {args.repetition_penalty}; load average {load_before:.1f} before, {load_after:.1f} after.",
        "",
        f"Fastest of {args.repeats} interleaved runs per side (all runs: sequential "
        f"{', '.join(f'{t:.1f}' for t in times_seq)} s; batched {', '.join(f'{t:.1f}' for t in times_batched)} s).",
        "",
        "| path | batch | seconds | prompts/s | generated tokens/s |",
        "|---|---:|---:|---:|---:|",
        f"| sequential `model.generate` | 1 | {seconds_seq:.1f} | {len(prompts) / seconds_seq:.2f} | "
        f"{tokens / seconds_seq:.1f} |",
        f"| `easysft infer` batched path | {args.batch_size} | {seconds_batched:.1f} | "
        f"{len(prompts) / seconds_batched:.2f} | {sum(map(len, batched)) / seconds_batched:.1f} |",
        "",
        f"Speed-up: **{ratio:.2f}x** (fastest runs; {median_ratio:.2f}x between medians). "
        f"Identical greedy outputs: **{'yes' if identical else 'no'}**"
        + ("" if identical else f" ({differing} of {len(prompts)} prompts differ)") + ".",
    ]
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
