"""Preemption and faults (issue 8): SIGTERM -> complete checkpoint + exit code 75 within 30 s; a second signal or
SIGKILL during a save leaves the previous checkpoint intact; non-finite steps are skipped, counted, and stop the run
with a checkpoint of the last good state. Signal tests run real `python -m easysft train` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easysft import checkpoint
from easysft.cli import main
from easysft.training.signals import PREEMPTED_EXIT_CODE


def start_training(out, model_dir, data_dir, log, *extra, env=None):
    argv = [sys.executable, "-m", "easysft", "train", "--data_path", data_dir, "--model_name_or_path", model_dir,
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--tensorboard", "false", *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"),  # noqa: SIM115
                            env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} | (env or {}))


def wait_for(predicate, proc, timeout=300.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def logged_steps(out) -> list[int]:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record and "event" not in record:
            steps.append(record["step"])
    return steps


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_75_within_30s(tiny_model_dir, qa_data_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    proc = start_training(out, tiny_model_dir, qa_data_dir, log, "--max_steps", "100000")
    wait_for(lambda: len(logged_steps(out)) >= 2, proc, what="two training steps")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    elapsed = time.monotonic() - sent
    stderr = log.read_text()
    assert rc == PREEMPTED_EXIT_CODE, stderr[-2000:]
    assert elapsed < 30, elapsed
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM after step" in stderr.strip().splitlines()[-1]
    last_step = logged_steps(out)[-1]
    latest = checkpoint.find_resume_checkpoint("latest", out)
    assert latest == checkpoint.step_dir(out, last_step)  # the step in flight was finished, then saved
    checkpoint.verify(latest)
    assert json.loads((latest / "trainer_state.json").read_text())["reason"] == "preempted"


@pytest.mark.slow
def test_second_signal_during_the_save_keeps_the_previous_checkpoint_then_resume(tiny_model_dir, qa_data_dir,
                                                                                 tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    flags = ("--max_steps", "5", "--save_steps", "1")
    proc = start_training(out, tiny_model_dir, qa_data_dir, log, *flags, env={"EASYSFT_PAUSE_BEFORE_COMPLETE": "3"})
    wait_for(lambda: "paused before COMPLETE of step 3" in log.read_text(), proc, what="the save of step 3")
    proc.send_signal(signal.SIGTERM)  # first: "stop after this step" (the save is already under way)
    wait_for(lambda: "SIGTERM received" in log.read_text(), proc, timeout=30, what="the first SIGTERM")
    proc.send_signal(signal.SIGTERM)  # second: now
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(out)] == [(1, True), (2, True), (3, False)]
    assert checkpoint.find_resume_checkpoint("latest", out) == checkpoint.step_dir(out, 2)

    resumed = start_training(out, tiny_model_dir, qa_data_dir, tmp_path / "resume.txt", *flags, "--resume")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resume.txt").read_text()[-2000:]
    assert "removing incomplete checkpoint" in (tmp_path / "resume.txt").read_text()
    assert logged_steps(out) == [1, 2, 3, 4, 5]
    assert all(done for _, _, done in checkpoint.list_checkpoints(out))


@pytest.mark.slow
def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(tiny_model_dir, qa_data_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    proc = start_training(out, tiny_model_dir, qa_data_dir, log, "--max_steps", "5", "--save_steps", "1",
                          env={"EASYSFT_PAUSE_BEFORE_COMPLETE": "2"})
    wait_for(lambda: "paused before COMPLETE of step 2" in log.read_text(), proc, what="the save of step 2")
    proc.kill()
    proc.wait(timeout=30)
    partial = checkpoint.step_dir(out, 2)
    assert (partial / "model.safetensors").is_file() and not checkpoint.is_complete(partial)
    latest = checkpoint.find_resume_checkpoint("latest", out)
    assert latest == checkpoint.step_dir(out, 1)
    checkpoint.verify(latest)
    assert checkpoint.load_tensors(latest)
    checkpoint.remove_incomplete(out)
    assert not partial.exists()


def cli_train(model_dir, data_dir, out, *extra):
    return main(["train", "--data_path", data_dir, "--model_name_or_path", model_dir, "--output_dir", str(out),
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--tensorboard", "false", *extra])


def test_nonfinite_step_is_skipped_counted_and_training_goes_on(tiny_model_dir, qa_data_dir, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("EASYSFT_INJECT_NAN_AT_STEP", "2")
    out = tmp_path / "out"
    assert cli_train(tiny_model_dir, qa_data_dir, out, "--max_steps", "3", "--save_steps", "1") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "nonfinite_step_skipped"] == [2]
    step1, step2, step3 = (load_file(str(checkpoint.step_dir(out, s) / "model.safetensors")) for s in (1, 2, 3))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)  # the NaN step changed nothing
    assert not all(torch.equal(step2[k], step3[k]) for k in step2)  # the next step trained again
    assert "step 2: non-finite loss/grad norm" in capsys.readouterr().err


def test_too_many_nonfinite_steps_stop_with_a_checkpoint_of_the_last_good_state(tiny_model_dir, qa_data_dir,
                                                                                tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EASYSFT_INJECT_NAN_AT_STEP", "2-99")
    out = tmp_path / "out"
    code = cli_train(tiny_model_dir, qa_data_dir, out, "--max_steps", "10", "--max_nonfinite_steps", "3",
                     "--save_steps", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 6
    assert err[-1].startswith("easysft: error: 3 non-finite steps in a row (last at step 4)")
    assert "Last good state saved in" in err[-1] and not any("Traceback" in line for line in err)
    saved = checkpoint.step_dir(out, 4)
    assert checkpoint.is_complete(saved)
    assert json.loads((saved / "trainer_state.json").read_text())["reason"] == "nonfinite"
    good, last = (load_file(str(checkpoint.step_dir(out, s) / "model.safetensors")) for s in (1, 4))
    assert all(torch.equal(good[k], last[k]) for k in good)
    assert not (out / "model.safetensors").exists()  # no final model from a failed run
