"""Generation eval under 2 CPU processes (DDP, and FSDP2 and DeepSpeed ZeRO-3 whose forward passes are
collectives) gives the same predictions and scores as one process (issue 15).

DDP: every rank holds the whole model; prompts are sharded over ranks and rank 0 gathers. FSDP2 and ZeRO-3: each
forward pass gathers the sharded weights from every rank, so ranks generate in lock step (equal prompt counts,
fixed batches, ``synced_gpus``). Learning rate 0 keeps the weights identical across the runs, so the comparison is
exactly about sharding, gathering and ordering (training parity has its own tests: test_parity.py). The runs join
the other distributed tests' runs in one torchrun and one deepspeed job (tests/distributed/launches.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QA_ROWS, write_qa_folder

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1800)]  # the shared launches (launches.py)

FIELDS = ("eval_exact_match", "eval_rouge_l", "eval_chrf", "eval_bleu")


def flags(model_dir: str, data_dir: str, out: Path, batch: int) -> list[str]:
    return ["--model_name_or_path", model_dir, "--data_path", data_dir, "--output_dir", str(out),
            "--max_steps", "2", "--eval_steps", "1", "--eval_generate", "5", "--eval_max_new_tokens", "4",
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "2",
            "--learning_rate", "0", "--tensorboard", "false", "--seed", "3"]


def generation_evals(out: Path) -> tuple[list[dict], dict[int, str]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scores = [{k: r[k] for k in ("step", *FIELDS)} for r in records if "eval_loss" in r]
    files = {int(p.stem.split("-")[1]): p.read_text() for p in (out / "eval_predictions").glob("step-*.jsonl")}
    return scores, files


def add_runs(plan) -> None:
    work = plan.folder("geneval")
    data_dir = write_qa_folder(work / "data", eval_rows=QA_ROWS[:7])  # 7 rows: uneven shards over 2 ranks
    plan.add("single", flags(plan.model_dir, data_dir, work / "single", 4))
    plan.add("torchrun", flags(plan.model_dir, data_dir, work / "ddp", 2) + ["--engine", "ddp"])
    plan.add("torchrun", flags(plan.model_dir, data_dir, work / "fsdp2", 2) + ["--engine", "fsdp"])
    plan.add("deepspeed", flags(plan.model_dir, data_dir, work / "zero3", 2) + ["--deepspeed", "--zero_stage", "3"])


def test_ddp_fsdp2_and_zero3_generation_eval_match_one_process(launched):
    work = launched.folder("geneval")
    reference = generation_evals(work / "single")
    assert [s["step"] for s in reference[0]] == [0, 1, 2] and len(reference[1]) == 3
    assert all(len(text.splitlines()) == 5 for text in reference[1].values())
    for name in ("ddp", "fsdp2", "zero3"):
        got = generation_evals(work / name)
        assert got[1] == reference[1], name  # the same predictions, rows in the same order
        for mine, ref in zip(got[0], reference[0], strict=True):
            assert mine == pytest.approx(ref), name
