"""Exact resume (issue 8): a run stopped at step N and resumed draws the SAME loss curve, bit for bit, and ends
with the SAME weights as the uninterrupted run -- with gradient accumulation, dropout and shuffling on, resuming
mid-epoch and at an epoch boundary. The stop comes from the EASYSFT_STOP_AFTER_STEP hook (a smaller --max_steps
would change the LR schedule). The reference, the stop and the epoch-boundary resume run in this process through
`easysft.cli.main` (a process start costs more than the 5 tiny steps); the final mid-epoch resume is a real
`python -m easysft train` process, so everything it needs provably comes from disk. test_signals.py covers the
preempted process's exit code 75."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easysft import checkpoint
from easysft.cli import main
from easysft.training.signals import PREEMPTED_EXIT_CODE
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.slow  # four tiny training runs, one of them a real process


def train_args(out, model_dir, data_dir, *extra) -> list[str]:
    """`easysft train` arguments: 8 rows, batch 2 x accumulation 2 = 2 steps per epoch, 5 steps."""
    return ["train", "--data_path", data_dir, "--model_name_or_path", model_dir, "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "5",
            "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "1",
            "--tensorboard", "false", "--seed", "11", *extra]


def train_process(*args):
    """`python -m easysft train ...` as a real process."""
    return subprocess.run([sys.executable, "-m", "easysft", *train_args(*args)], capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=600)


def step_losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r]
    assert len({s for s, _ in losses}) == len(losses), f"duplicate steps in metrics.jsonl: {losses}"
    return dict(losses)


def assert_same_weights(a, b):
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with attention dropout on: without the saved RNG state, a resume would diverge."""
    folder = tmp_path_factory.mktemp("tiny-llama-dropout")
    make_tiny_model(tokenizer, seed=3, attention_dropout=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_stop_and_resume_is_bit_identical_mid_epoch_and_at_epoch_boundary(dropout_model_dir, qa_data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    full, stopped, from_boundary = tmp_path / "full", tmp_path / "stopped", tmp_path / "from-boundary"

    assert main(train_args(full, dropout_model_dir, qa_data_dir)) == 0
    reference = step_losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5]

    # Preempted after step 3 (epoch 1, micro-batch 2 of 4: mid-epoch); --save_steps 2 also leaves step-2, written
    # at the end of epoch 0 (an epoch boundary).
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setenv("EASYSFT_STOP_AFTER_STEP", "3")
        assert main(train_args(stopped, dropout_model_dir, qa_data_dir, "--save_steps", "2")) == PREEMPTED_EXIT_CODE
    assert "stopped by EASYSFT_STOP_AFTER_STEP after step 3" in capsys.readouterr().err.strip().splitlines()[-1]
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(stopped)] == [(2, True), (3, True)]
    state = json.loads((checkpoint.step_dir(stopped, 3) / "trainer_state.json").read_text())
    assert (state["epoch"], state["next_micro_batch"], state["reason"]) == (1, 2, "preempted")
    assert not (stopped / "model.safetensors").exists()  # no final model from a preempted run

    # Resume at the epoch boundary (step-2) into a fresh folder.
    assert main(train_args(from_boundary, dropout_model_dir, qa_data_dir, "--resume",
                           str(checkpoint.step_dir(stopped, 2)))) == 0
    assert step_losses(from_boundary) == {s: reference[s] for s in (3, 4, 5)}
    assert_same_weights(full, from_boundary)

    # Resume the stopped run itself mid-epoch ('latest' = step-3) in a fresh process: the whole curve equals the
    # reference.
    proc = train_process(stopped, dropout_model_dir, qa_data_dir, "--save_steps", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert step_losses(stopped) == reference
    assert_same_weights(full, stopped)
    eval_steps = [json.loads(x)["step"] for x in (stopped / "metrics.jsonl").read_text().splitlines()
                  if "eval_loss" in x]
    full_eval_steps = [json.loads(x)["step"] for x in (full / "metrics.jsonl").read_text().splitlines()
                       if "eval_loss" in x]
    assert eval_steps == full_eval_steps
