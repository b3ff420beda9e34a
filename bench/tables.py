"""Markdown tables rendered from the benchmark results files (``bench/results/*.json``), and nothing else.

The benchmarks write JSON; ``bench/results/*.md`` and the README's benchmark blocks are both rendered from it by
these functions (``python -m bench.readme_tables``), so a figure can never drift from its results file. Every
derived number (tokens/s, MFU, ratios) is computed here from the stored counts and times.
"""

from __future__ import annotations

import statistics

from bench.flops import ModelShape, attention_flops, classic_flops, lm_head_positions, mfu, model_flops

TRL = "TRL SFTTrainer"

TIMING = {
    "loop": (
        "**Timing** (the same for both tools): each tool runs in its own worker process, which stamps the end of "
        "every optimizer step at the same point (after the optimizer step, before that step's logging: TRL's "
        "`on_step_end` callback, the return of easysft's `train_step`). **loop s** = last stamp - first stamp = "
        "steps 2..N, each with the previous step's logging, eval and save checks, its batch collation, forward, "
        "backward and optimizer step; step 1 (data-loader set-up, first allocations, optimizer state) is left out "
        "for both. tokens/s = real tokens of those steps / loop s. **process s** is the whole worker process, "
        "timed from outside (imports, load, data, training, the final eval on the same rows, save; easysft also "
        "evaluates at step 0)."
    ),
    "step_sum": (
        "**Timing** (this run predates the common timing window, so the two tools were timed differently): "
        "**loop s** is the sum of per-step times; easysft's step ran from its own batch collation to the end of "
        "the optimizer step (its logging and eval checks outside), TRL's from one `on_step_end` to the next, so it "
        "also held the previous step's logging and, in step 1, the data-loader set-up; TRL's per-step "
        "metrics were on. **process s** is the whole process, timed "
        "from outside. Rerun `python -m bench.bench_train` for the common window."
    ),
}

DEFINITIONS = (
    "**MFU** = the model FLOPs each tool computes per second / the measured fp32 matmul peak. FLOPs: "
    "{factor} x the decoder's matmul weights ({body:,}: q, k, v, o, gate, up, down in {layers} layers) per real "
    "token, plus the same factor x the LM head's weights ({head:,} = vocab x hidden) per position the tool "
    "projects through it: easysft only the supervised positions, TRL every position (TRL 1.16's fused LM head "
    "scores all positions on CPU; on CUDA it scores only labelled ones); LoRA adds 6 x the adapter weights per "
    "token; the factor is 6 for full fine-tuning (forward, input gradient, weight gradient) and 4 for LoRA (no "
    "weight gradient for frozen weights). Not counted: attention scores ({attention}), the embedding lookup, "
    "norms, padding, and the forward that gradient checkpointing recomputes. **6N-MFU** is the classic count: "
    "6 x N (4 x N for LoRA) per real token, N = all {num_params:,} parameters, whatever the tool skips; it "
    "credits easysft with LM-head FLOPs it never runs."
)

HANDICAPS = (
    "**Handicaps**, all left at each tool's defaults and listed here: TRL pads each batch to its longest sample "
    "({padded:,} positions for {real:,} real tokens) and runs the whole model and its LM head over the padding; it "
    "checkpoints activations (`SFTConfig`'s default; the `easysft --gradient_checkpointing` row is easysft with "
    "the same setting); it computes per-token entropy and top-1 accuracy over the vocabulary inside its fused LM "
    "head and syncs them to the CPU every step for its logs (TRL 1.16's `SFTTrainer.compute_loss` always does; "
    "there is no switch to turn them off); it logs every {trl_log} steps. easysft writes a metrics.jsonl line "
    "every step and returns freed memory to the OS after each forward and twice per backward "
    "(`--release_cpu_memory`; its cost is measured in `bench/results/release_memory.md`)."
)


def _attention_note(meta: dict, shape: ModelShape) -> str:
    lengths = meta.get("sample_lengths")
    if not lengths:
        return "QK^T and AV"
    extra = attention_flops(shape, "full", lengths) / model_flops(shape, "full", sum(lengths), sum(lengths))
    return (f"QK^T and AV, which would add {100 * extra:.1f}% to the full-model count at these {min(lengths)}-"
            f"{max(lengths)}-token samples")


def run_flops(result: dict, meta: dict) -> tuple[int, int]:
    """``(tool's model FLOPs, classic 6N FLOPs)`` of ``result``'s timed steps."""
    shape = ModelShape(**meta["model_shape"])
    tokens, supervised = result["timed_tokens"], result["timed_supervised_tokens"]
    lora = meta.get("lora", {})
    adapters = shape.lora_params(lora["rank"], lora["targets"]) if result["mode"] == "lora" else 0
    flops = model_flops(shape, result["mode"], tokens, lm_head_positions(result["tool"], tokens, supervised), adapters)
    return flops, classic_flops(result["num_params"], result["mode"], tokens)


def _per_s(count: float, seconds: float) -> float:
    return count / seconds if seconds else 0.0


def train_rows(payload: dict) -> list[dict]:
    """One dict of derived numbers per successful run: tokens/s, MFU, 6N-MFU (fractions), plus the raw result."""
    meta, peak = payload["meta"], payload["peak_gflops"]
    rows = []
    for r in payload["results"]:
        if r["error"]:
            rows.append({**r})
            continue
        flops, classic = run_flops(r, meta)
        rows.append({**r, "tokens_per_s": _per_s(r["timed_tokens"], r["timed_s"]),
                     "supervised_per_s": _per_s(r["timed_supervised_tokens"], r["timed_s"]),
                     "mfu": mfu(flops, r["timed_s"], peak), "mfu_6n": mfu(classic, r["timed_s"], peak)})
    return rows


def train_markdown(payload: dict) -> str:
    """The training benchmark's header, run table, ratio table, definitions and handicaps."""
    meta, peak = payload["meta"], payload["peak_gflops"]
    shape = ModelShape(**meta["model_shape"])
    lora = meta["lora"]
    load = meta.get("load_average")
    load_text = (f"; load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after (2 cores)"
                 if load else "")
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; fp32 matmul peak {peak:.0f} GFLOP/s (1024^3, best of "
        f"runs before and after the trainers){load_text}.",
        f"Model: bundled SmolLM2-135M ({meta['num_params']:,} parameters), fp32. Data: {meta['data']}.",
        f"Both: batch 8 (easysft: the 8 samples of each step packed into one padding-free row), {meta['steps']} "
        f"optimizer steps = one epoch, lr 5e-05 (full) / 0.0002 (LoRA r={lora['rank']} alpha={lora['alpha']} on "
        f"{','.join(lora['targets'])}), AdamW betas (0.9, 0.95), linear schedule, clip 1.0.",
        meta["note"],
        "",
        "| mode | tool | steps (timed) | loop s | process s | tokens/s | supervised tokens/s | peak RSS MB "
        "| final eval loss | MFU | 6N-MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = train_rows(payload)
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['mode']} | {r['tool']} | failed: {r['error']} |||||||||")
            continue
        lines.append(f"| {r['mode']} | {r['tool']} | {r['steps']} ({r['timed_steps']}) | {r['timed_s']:.1f} | "
                     f"{r['process_s']:.1f} | {r['tokens_per_s']:.1f} | {r['supervised_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['eval_loss']:.4f} | {100 * r['mfu']:.1f}% | "
                     f"{100 * r['mfu_6n']:.1f}% |")
    lines += ["", "| mode (tool) | tokens/s easysft/TRL | MFU easysft/TRL | peak RSS easysft/TRL | eval loss easysft/TRL "
              "| process wall easysft/TRL |", "|---|---:|---:|---:|---:|---:|"]
    for e, t in ratio_pairs(rows):
        lines.append(f"| {e['mode']} ({e['tool']}) | {e['tokens_per_s'] / t['tokens_per_s']:.2f}x | "
                     f"{e['mfu'] / t['mfu']:.2f}x | {e['peak_rss_mb'] / t['peak_rss_mb']:.2f}x | "
                     f"{e['eval_loss'] / t['eval_loss']:.4f} | {e['process_s'] / t['process_s']:.2f}x |")
    factor = "6 (full) / 4 (LoRA)"
    lines += ["", DEFINITIONS.format(factor=factor, body=shape.body_matmul_params, layers=shape.layers,
                                     head=shape.lm_head_params, attention=_attention_note(meta, shape),
                                     num_params=meta["num_params"]),
              "", TIMING[meta.get("timing", "step_sum")],
              "", HANDICAPS.format(padded=meta["padded_tokens"], real=meta["real_tokens"],
                                   trl_log=max(1, meta["steps"] // 4))]
    return "\n".join(lines) + "\n"


def ratio_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """``(easysft row, TRL row)`` for every successful easysft row with a successful TRL row of the same mode."""
    pairs = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ok = [r for r in rows if r["mode"] == mode and not r["error"]]
        trl = next((r for r in ok if r["tool"] == TRL), None)
        pairs += [(r, trl) for r in ok if trl is not None and r is not trl]
    return pairs


def lora_markdown(payload: dict) -> str:
    """easysft full fine-tuning vs LoRA from the training benchmark's run (same data, steps and machine)."""
    meta = payload["meta"]
    shape, lora = ModelShape(**meta["model_shape"]), meta["lora"]
    rows = {r["mode"]: r for r in train_rows(payload) if r["tool"] == "easysft" and not r["error"]}
    full, low = rows["full"], rows["lora"]
    adapters = shape.lora_params(lora["rank"], lora["targets"])
    lines = [
        f"From `bench/results/train.json` ({meta['date']}, the easysft rows: same data, {meta['steps']} steps, packed, "
        f"batch 8, fp32). {meta['note']}",
        "",
        "| mode | trainable parameters | tokens/s | peak RSS (MB) | final eval loss | MFU | 6N-MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| full | {full['num_params']:,} (100%) | {full['tokens_per_s']:.1f} | {full['peak_rss_mb']:,.0f} | "
        f"{full['eval_loss']:.4f} | {100 * full['mfu']:.1f}% | {100 * full['mfu_6n']:.1f}% |",
        f"| LoRA r={lora['rank']} on {','.join(lora['targets'])} | {adapters:,} ({100 * adapters / low['num_params']:.2f}%)"
        f" | {low['tokens_per_s']:.1f} | {low['peak_rss_mb']:,.0f} | {low['eval_loss']:.4f} | "
        f"{100 * low['mfu']:.1f}% | {100 * low['mfu_6n']:.1f}% |",
        "",
        f"LoRA / full: **{low['tokens_per_s'] / full['tokens_per_s']:.2f}x the tokens/s, "
        f"{low['peak_rss_mb'] / full['peak_rss_mb']:.2f}x the peak memory**. (MFU and 6N-MFU as defined in the "
        "Speed section; LoRA's count uses 4x for the frozen weights.)",
    ]
    return "\n".join(lines) + "\n"


def release_memory_markdown(payload: dict) -> str:
    """The price of ``--release_cpu_memory`` (on by default): easysft with it and without it, same job, one run."""
    meta = payload["meta"]
    rows = {r["tool"]: r for r in train_rows(payload) if not r["error"]}
    on, off = rows["easysft"], rows["easysft --release_cpu_memory false"]
    lines = [
        f"From `bench/results/release_memory.json` ({meta['date']}, `python -m bench.bench_train --tools "
        f"easysft,easysft-keep-memory --modes full`: the training benchmark's full fine-tuning job, "
        f"{meta['steps']} steps, packed, fp32). {meta['note']}",
        "",
        "| easysft | tokens/s | peak RSS (MB) | final eval loss |",
        "|---|---:|---:|---:|",
    ]
    for label, row in (("default (`--release_cpu_memory true`)", on), ("`--release_cpu_memory false`", off)):
        lines.append(f"| {label} | {row['tokens_per_s']:.1f} | {row['peak_rss_mb']:,.0f} | {row['eval_loss']:.4f} |")
    lines += ["", f"Returning freed memory: **{on['peak_rss_mb'] - off['peak_rss_mb']:+,.0f} MB peak RSS** "
              f"({on['peak_rss_mb'] / off['peak_rss_mb']:.2f}x) at **{on['tokens_per_s'] / off['tokens_per_s']:.2f}x "
              "the tokens/s** (one run each: differences within ~5% are noise on this machine)."]
    return "\n".join(lines) + "\n"


def infer_markdown(payload: dict) -> str:
    """The inference benchmark: batch-1 ``generate``, HF's batched ``generate`` and easysft's path."""
    meta, runs = payload["meta"], {r["path"]: r for r in payload["runs"]}
    easy = runs["easysft"]
    lines = [
        f"Bundled SmolLM2-135M-Instruct, fp32, CPU ({meta['machine']}); {meta['num_prompts']} prompts of "
        f"{meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} tokens (template '{meta['template']}'), greedy, "
        f"{meta['max_new_tokens']} new tokens max, repetition_penalty {meta['repetition_penalty']}; load average "
        f"{meta['load_average']['before'][0]:.1f} before, {meta['load_average']['after'][0]:.1f} after; "
        f"{meta['date']}. {meta['note']}",
        "",
        f"Fastest of {meta['repeats']} interleaved runs per path (all runs in the JSON).",
        "",
        "| path | batch | seconds | prompts/s | generated tokens/s | easysft speed-up over it (medians) "
        "| identical outputs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in payload["runs"]:
        seconds = min(r["seconds"])
        median = statistics.median(r["seconds"]) / statistics.median(easy["seconds"])
        speedup = "-" if r is easy else f"**{seconds / min(easy['seconds']):.2f}x** ({median:.2f}x)"
        same = "(reference)" if r["path"] == "sequential" else ("yes" if r["identical"] else
                                                                 f"no ({r['differing']} prompts differ)")
        lines.append(f"| {r['label']} | {r['batch']} | {seconds:.1f} | {meta['num_prompts'] / seconds:.2f} | "
                     f"{r['generated_tokens'] / seconds:.1f} | {speedup} | {same} |")
    lines += ["", "The first peer, `model.generate` on one prompt at a time, does no batching at all: the speed-up "
              "over it measures batching. The second, `model.generate` on left-padded batches of the same size "
              "(longest first, transformers' own repetition penalty, which also counts the pad tokens of padded "
              "rows), "
              "is what a transformers user gets by batching; the speed-up over it measures easysft's length-sorted "
              "prompt buckets and per-row stopping."]
    return "\n".join(lines) + "\n"
