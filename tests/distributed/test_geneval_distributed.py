"""Generation eval under 2 CPU processes (DDP, and DeepSpeed ZeRO-3 whose forward passes are collectives) gives
the same predictions and scores as one process (issue 15).

DDP: every rank holds the whole model; prompts are sharded over ranks and rank 0 gathers. ZeRO-3: each forward
pass gathers the partitioned weights from every rank, so ranks generate in lock step (equal prompt counts, fixed
batches, ``synced_gpus``). Learning rate 0 keeps the weights identical across the runs, so the comparison is
exactly about sharding, gathering and ordering (training parity has its own tests: test_parity.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QA_ROWS, write_qa_folder
from dist_launch import deepspeed_cmd, launch_env, run_many, torchrun_cmd

from easysft.cli import main

pytestmark = pytest.mark.distributed

FIELDS = ("eval_exact_match", "eval_rouge_l", "eval_chrf", "eval_bleu")


def flags(model_dir: str, data_dir: Path, out: Path, batch: int) -> list[str]:
    return ["--model_name_or_path", model_dir, "--data_path", str(data_dir), "--output_dir", str(out),
            "--max_steps", "2", "--eval_steps", "1", "--eval_generate", "5", "--eval_max_new_tokens", "4",
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "2",
            "--learning_rate", "0", "--tensorboard", "false", "--seed", "3"]


def generation_evals(out: Path) -> tuple[list[dict], dict[int, str]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scores = [{k: r[k] for k in ("step", *FIELDS)} for r in records if "eval_loss" in r]
    files = {int(p.stem.split("-")[1]): p.read_text() for p in (out / "eval_predictions").glob("step-*.jsonl")}
    return scores, files


def test_ddp_and_zero3_generation_eval_match_one_process(tmp_path, tiny_model_dir):
    data_dir = write_qa_folder(tmp_path / "data", eval_rows=QA_ROWS[:7])  # 7 rows: uneven shards over 2 ranks
    env = launch_env(tmp_path / "cache")
    assert main(["train", *flags(tiny_model_dir, data_dir, tmp_path / "single", 4)]) == 0  # in this process
    run_many(torchrun_cmd(2), [flags(tiny_model_dir, data_dir, tmp_path / "ddp", 2) + ["--engine", "ddp"]],
             tmp_path, env)
    run_many(deepspeed_cmd(2), [flags(tiny_model_dir, data_dir, tmp_path / "zero3", 2)
                                + ["--deepspeed", "--zero_stage", "3"]], tmp_path, env)
    reference = generation_evals(tmp_path / "single")
    assert [s["step"] for s in reference[0]] == [0, 1, 2] and len(reference[1]) == 3
    assert all(len(text.splitlines()) == 5 for text in reference[1].values())
    for name in ("ddp", "zero3"):
        got = generation_evals(tmp_path / name)
        assert got[1] == reference[1], name  # the same predictions, rows in the same order
        for mine, ref in zip(got[0], reference[0], strict=True):
            assert mine == pytest.approx(ref), name

