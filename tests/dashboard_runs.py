"""Run folders for the dashboard tests, written file by file the way training writes them (no training).

``write_run`` makes metrics.jsonl (train records every step, eval records every ``eval_every`` steps with
generation metrics), train_config.json, data_report.json (from the real report builder), run_status.json,
optional checkpoints, eval predictions and a final model (copied from a tiny model folder).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path


def train_record(step: int, total: int = 40) -> dict:
    loss = 2.5 * math.exp(-step / 15) + 0.3
    return {"step": step, "epoch": round(step / total, 4), "loss": loss, "lr": 5e-5 * (1 - step / (total + 1)),
            "grad_norm": 1.0 + 0.5 * math.sin(step), "num_tokens": 100, "total_tokens": 180,
            "tokens_per_s": 900.0 + step, "supervised_tokens_per_s": 500.0}


def eval_record(step: int) -> dict:
    loss = 2.6 * math.exp(-step / 18) + 0.35
    return {"step": step, "epoch": 0.0, "eval_loss": loss, "eval_ppl": math.exp(loss), "eval_num_tokens": 400,
            "eval_exact_match": min(1.0, step / 40), "eval_rouge_l": min(1.0, 0.2 + step / 50)}


def metrics_lines(steps: int, eval_every: int = 10, total: int = 40) -> list[str]:
    lines = [json.dumps(eval_record(0))]
    for step in range(1, steps + 1):
        lines.append(json.dumps(train_record(step, total)))
        if step % eval_every == 0:
            lines.append(json.dumps(eval_record(step)))
    return lines


def data_report() -> dict:
    from easysft.data.report import SourceStats, SplitStats, build_report

    train = SplitStats(rows=12)
    for n in range(10):
        train.add_sample({"num_prompt_tokens": 5 + 3 * n, "num_answer_tokens": 2 + n, "input_ids": [1] * (7 + 4 * n),
                          "labels": [-100] * (5 + 3 * n) + [1] * (2 + n), "prompt_truncated": n == 9,
                          "answer_truncated": False})
    train.add_skip("empty_answer", "data/train.json:7")
    train.add_skip("empty_answer", "data/train.json:9")
    source = SourceStats("data/train.json", "qa", "eval.json", train=train, eval=SplitStats())
    return build_report([source], template="qa", max_prompt_len=64, max_ans_len=32)


def write_run(folder: Path, *, state: str, steps: int, total: int = 40, model_dir: str | None = None,
              predictions: dict[int, list[dict]] | None = None, checkpoint_steps=(), learning_rate: float = 5e-5,
              pid: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(metrics_lines(steps, total=total)) + "\n", encoding="utf-8")
    config = {"model_name_or_path": model_dir or "bundled", "data_path": ["data/"], "template": "qa",
              "max_prompt_len": 64, "max_ans_len": 32, "learning_rate": learning_rate, "lora_dim": 0,
              "seed": 1234, "total_steps": total, "do_sample": False, "max_new_tokens": 8, "repetition_penalty": 1.0}
    (folder / "train_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "data_report.json").write_text(json.dumps(data_report()), encoding="utf-8")
    now = time.time()
    status = {"state": state, "pid": pid if pid is not None else os.getpid(), "host": socket.gethostname(),
              "started_at": now - 600, "updated_at": now}
    (folder / "run_status.json").write_text(json.dumps(status), encoding="utf-8")
    for step in checkpoint_steps:
        ckpt = folder / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "reason": "save_steps"}), encoding="utf-8")
        (ckpt / "COMPLETE").write_text("{}", encoding="utf-8")
    for step, rows in (predictions or {}).items():
        (folder / "eval_predictions").mkdir(exist_ok=True)
        (folder / "eval_predictions" / f"step-{step}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{torn line", encoding="utf-8")
    if model_dir is not None and state == "finished":
        for item in Path(model_dir).iterdir():
            if item.is_file():
                shutil.copy(item, folder / item.name)
        from easysft.data.templates import Template

        meta = {"template": Template.from_name("qa").to_dict(), "max_prompt_len": 64,
                "max_ans_len": 32, "generation": {"do_sample": False, "max_new_tokens": 12, "repetition_penalty": 1.0}}
        (folder / "easysft.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


PREDICTION_ROWS = [
    {"prompt": "Reverse the words: red green blue", "reference": "blue green red", "prediction": "blue green red"},
    {"prompt": "What is 2 + 2?", "reference": "4", "prediction": "5"},
    {"prompt": "Say hello in Japanese.", "reference": "こんにちは", "prediction": "<b>not html</b>"},
]
