"""The shared distributed launches (tests/distributed/launches.py) keep a failing run's damage to its own tests:
the runs that finished serve their groups, a failed or unstarted run fails only the tests of its group.

Checked without a second process where possible: the single-process runs go through the same bookkeeping, and
``run_many`` is driven with plain ``python`` as its one-rank "launcher" (the records are per rank either way).
"""

from __future__ import annotations

import sys

import pytest
from conftest import write_qa_folder

from tests.distributed.dist_launch import launch_env, run_many
from tests.distributed.launches import Plan


def _argv(model_dir: str, data_dir: str, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--data_path", data_dir, "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--tensorboard", "false", *extra]


def test_a_failed_run_fails_only_its_own_group(tiny_model_dir, tmp_path):
    plan = Plan(tmp_path / "plan", tiny_model_dir)
    data_dir = write_qa_folder(plan.folder("data"))
    plan.add("single", _argv(tiny_model_dir, data_dir, plan.folder("good") / "run"))
    plan.add("single", _argv(tiny_model_dir, data_dir, plan.folder("bad") / "run", "--learning_rate", "-1"))
    plan.run()
    assert (plan.folder("good") / "run" / "model.safetensors").is_file()
    with pytest.raises(pytest.fail.Exception, match="did not end as expected"):
        plan.folder("bad")


def test_run_many_goes_on_after_a_failed_run_and_reports_it(tiny_model_dir, tmp_path):
    data_dir = write_qa_folder(tmp_path / "data")
    runs = [_argv(tiny_model_dir, data_dir, tmp_path / "first"),
            _argv(tiny_model_dir, data_dir, tmp_path / "second", "--learning_rate", "-1"),  # exits 2
            _argv(tiny_model_dir, data_dir, tmp_path / "third")]
    job = run_many([sys.executable], runs, tmp_path, launch_env(tmp_path / "cache"), nproc=1)
    assert job.done == {0, 2} and list(job.failed) == [1] and job.launches == 1
    assert "rank 0: exited 2, expected 0" in job.failed[1]
    assert job.finished.returncode == 2  # the job still says that a run failed
    assert "--learning_rate" in job.run_output(1) and "did not end as expected" in job.run_output(1)
    assert "run 2 started" not in job.run_output(1)
    assert (tmp_path / "first" / "model.safetensors").is_file() and (tmp_path / "third" / "model.safetensors").is_file()
