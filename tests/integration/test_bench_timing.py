"""The training benchmark's easysft clock (``bench/timing.py``) on a tiny model: it must stamp every optimizer
step of a real ``easysft train`` run, with the step's own token counts, and leave the loop as it found it."""

from __future__ import annotations

import json

import easysft.training.loop as loop
from bench.timing import run_easysft_timed


def test_easysft_step_clock_stamps_every_step(tiny_model_dir, qa_data_dir, tmp_path):
    untimed = loop.train_step
    out = tmp_path / "out"
    code, summary = run_easysft_timed([
        "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--max_steps", "3", "--packing", "--tensorboard", "false"])
    assert code == 0
    assert loop.train_step is untimed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    assert summary["steps"] == len(steps) == 3 and summary["timed_steps"] == 2
    assert summary["extra"]["step_tokens"] == [r["total_tokens"] for r in steps]
    assert summary["timed_tokens"] == sum(r["total_tokens"] for r in steps[1:])
    assert summary["timed_supervised_tokens"] == sum(r["num_tokens"] for r in steps[1:])
    # The window (end of step 1 -> end of step 3) holds steps 2 and 3 whole, plus the logging between them.
    inside = sum(r["total_tokens"] / r["tokens_per_s"] for r in steps[1:])
    assert summary["timed_s"] >= inside * 0.999
    assert summary["extra"]["step_ends_s"] == sorted(summary["extra"]["step_ends_s"])
