"""Does a model learn to call the right function? SmolLM2-135M (bundled) on synthetic tool-calling conversations.

Writes a data folder (``train.jsonl``, ``eval.jsonl`` from :mod:`bench.tool_data`), trains with
``--template chat --chat_template chatml_tools`` and generation eval on the eval conversations turn by turn
(step 0 = the model before training), then writes ``bench/results/tool_calling.{json,md}`` with
``eval_tool_call_name`` / ``eval_tool_call_exact`` (tool-call turns) and ``eval_exact_match`` (answer turns) before
and after.

    python -m bench.tool_calling_run [--train_rows 160 --max_steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from bench.tool_data import write

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KEYS = ("eval_tool_call_name", "eval_tool_call_exact", "eval_exact_match", "eval_loss")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/easysft-tool-calling")
    parser.add_argument("--train_rows", type=int, default=160)
    parser.add_argument("--eval_rows", type=int, default=12)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    args = parser.parse_args()

    data = os.path.join(args.work, "data")
    os.makedirs(data, exist_ok=True)
    write(os.path.join(data, "train.jsonl"), args.train_rows, seed=0)
    write(os.path.join(data, "eval.jsonl"), args.eval_rows, seed=1)  # other cities, amounts and phrasings
    out = os.path.join(args.work, "run")
    cmd = [sys.executable, "-m", "easysft", "train", "--model_name_or_path", "bundled", "--data_path", data,
           "--template", "chat", "--chat_template", "chatml_tools", "--max_seq_len", "768", "--max_steps", str(args.max_steps),
           "--per_device_train_batch_size", str(args.batch), "--learning_rate", str(args.learning_rate),
           "--eval_steps", str(args.max_steps), "--eval_generate", "64", "--eval_max_new_tokens", "48",
           "--output_dir", out, "--overwrite_output_dir", "--tensorboard", "false"]
    started = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.time() - started
    evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")
             if '"eval_tool_call_exact"' in line]
    before, after = evals[0], evals[-1]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join(cmd[2:]), "seconds": round(seconds, 1), "steps": after["step"],
              "before": {k: before.get(k) for k in KEYS}, "after": {k: after.get(k) for k in KEYS}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "tool_calling.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    lines = [f"# Tool calling: SmolLM2-135M on synthetic agent conversations ({result['date']})", "",
             f"`python -m bench.tool_calling_run` on {result['machine']}: {args.train_rows} training conversations, "
             f"{args.eval_rows} eval conversations (each assistant turn generated from the turns before it), "
             f"{result['steps']} steps, {result['seconds']} s for the whole run.", "",
             "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {result['before'][k]:.4g} | {result['after'][k]:.4g} |" for k in KEYS
              if result["before"].get(k) is not None]
    with open(os.path.join(RESULTS, "tool_calling.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
