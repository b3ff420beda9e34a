"""Inference benchmark: `easysft infer`'s batched path vs two transformers peers, in ONE process.

    python -m bench.bench_infer                        # 24 prompts, 16 new tokens, batches of at most 24
    python -m bench.bench_infer --num_prompts 8 --max_new_tokens 8 --repeats 1 --out ''   # a smoke run

All paths run on the same loaded model (the bundled SmolLM2-135M-Instruct, fp32) and the same prompt ids
(rendered with the model's template exactly as `easysft infer` renders them), with the same greedy settings:
``do_sample=False`` and the original design's ``repetition_penalty=2.0``.

- batch-1 ``generate`` (the first peer, and the reference output): ``model.generate`` on one unpadded prompt at a
  time. It does no batching at all, so the speed-up over it measures batching;
- batched ``generate`` (the second peer): ``model.generate`` on left-padded batches of ``--batch_size`` prompts,
  longest first as easysft orders them, with transformers' own repetition penalty (which also penalises the pad
  token, here the EOS, in padded rows, so its outputs may differ). The speed-up over it measures what easysft adds
  to batching: the prompt pass in length buckets and rows that stop at their own EOS;
- easysft: :func:`easysft.generate.generate_ids`, the function `easysft infer` calls: prompts sorted by length,
  the prompt pass in length buckets whose key/value caches are stitched into one left-padded decoding batch,
  padding-aware repetition penalty, each row stopping at its own EOS, input order restored.

A short warm-up runs first (one-off allocations and lazy initialisation are charged to no path). Writes
``bench/results/infer.json`` (every run's time, the load average before and after) and the ``.md`` rendered from it
by :mod:`bench.tables`. Never pass/fail: on a machine shared with other jobs, absolute times move; the paths run
interleaved and the fastest run of each counts, so the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    parser.add_argument("--out", default=str(RESULTS / "infer.json"), help="results file ('' = write nothing)")
    parser.add_argument("--note", default="The machine was shared with other jobs: absolute times are under "
                        "contention, the ratios come from interleaved runs.")
    return parser.parse_args(argv)


def sequential(model, tokenizer, prompts, max_new_tokens, repetition_penalty, stop_ids):
    """The first peer: plain transformers generate, one prompt at a time, no padding."""
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



def hf_batched(model, tokenizer, prompts, max_new_tokens, repetition_penalty, stop_ids, batch_size):
    """The second peer: transformers generate on left-padded batches (longest first), outputs in input order."""
    import torch

    from easysft.generate import cut_at_stop

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int] | None] = [None] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]):] = 1
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, repetition_penalty=repetition_penalty,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
            for row, i in enumerate(rows):
                outputs[i] = cut_at_stop(out[row, width:].tolist(), stop_ids)
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
    penalty, new = args.repetition_penalty, args.max_new_tokens
    paths = {  # name -> (table label, batch, callable(max_new_tokens, prompts))
        "sequential": ("batch-1 `model.generate` (peer 1)", 1,
                       lambda n, p: sequential(model, tokenizer, p, n, penalty, stop_ids)),
        "hf_batched": ("left-padded batched `model.generate` (peer 2)", args.batch_size,
                       lambda n, p: hf_batched(model, tokenizer, p, n, penalty, stop_ids, args.batch_size)),
        "easysft": ("`easysft infer`'s path", args.batch_size,
                    lambda n, p: generate_ids(model, tokenizer, p, gen, max_new_tokens=n, batch_size=args.batch_size)),
    }
    for _, _, call in paths.values():  # warm-up: every code path once on two short prompts
        call(2, prompts[:2])

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows every path alike
        for name, (_, _, call) in paths.items():
            start = time.perf_counter()
            outputs[name] = call(new, prompts)
            times[name].append(time.perf_counter() - start)
    reference = outputs["sequential"]
    runs = [{"path": name, "label": label, "batch": batch, "seconds": times[name],
             "generated_tokens": sum(map(len, outputs[name])), "identical": outputs[name] == reference,
             "differing": sum(a != b for a, b in zip(outputs[name], reference, strict=True))}
            for name, (label, batch, _) in paths.items()]
    payload = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M"), "num_prompts": len(prompts), "prompt_tokens": [lengths[0], lengths[-1]],
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"{platform.machine()}",
        "template": settings.template.name, "max_new_tokens": new, "repetition_penalty": penalty,
        "batch_size": args.batch_size, "repeats": args.repeats, "note": args.note,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }, "runs": runs}
    from bench.tables import infer_markdown

    print(infer_markdown(payload))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        if out.resolve().parent == RESULTS.resolve():
            from bench.readme_tables import write_results_markdown

            print(f"wrote {out} and {write_results_markdown(out.stem)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
