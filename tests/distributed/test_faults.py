"""Faults with 2 processes: a non-finite step is skipped on every rank alike, and a crash on one rank ends the
whole job quickly, non-zero, naming the rank and the error.

Step 2's loss is made NaN on every rank (``EASYSFT_INJECT_NAN_AT_STEP=2``, easysft/testing_hooks.py): the engine must
drop that update everywhere, so step 3 trains on intact weights (finite loss and gradient norm).

The crash is injected with the testing hook ``EASYSFT_FAIL_AT_STEP=3 EASYSFT_FAIL_RANK=1`` (easysft/testing_hooks.py):
rank 1 raises after step 3 while rank 0 goes on into step 4's collective and would wait there until the process
group's timeout. The launcher must stop it: the job has to end within 60 s of the crash (measured from the time
the hook writes into its message to the launcher's exit).
"""

from __future__ import annotations

import json
import math
import re

import pytest
from dist_launch import deepspeed_cmd, launch_env, run, torchrun_cmd

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_nonfinite_step_is_skipped_and_a_crash_on_one_rank_ends_the_job(launcher, tmp_path, qa_data_dir,
                                                                        tiny_model_dir):
    args = ["train", "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir,
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "50",
            "--tensorboard", "false"]
    if launcher == "torchrun":
        cmd = torchrun_cmd(2, "-m", "easysft", *args, "--engine", "ddp")
    else:  # the documented DeepSpeed entry: `deepspeed --num_gpus N --module easysft train ...`
        cmd = deepspeed_cmd(2, "--module", "easysft", *args, "--deepspeed", "--zero_stage", "2")
    env = launch_env(tmp_path / "cache", EASYSFT_FAIL_AT_STEP="3", EASYSFT_FAIL_RANK="1",
                     EASYSFT_INJECT_NAN_AT_STEP="2")

    finished = run(cmd, env, timeout_s=600)

    assert finished.returncode != 0, finished.output[-4000:]
    assert "easysft: rank 1: InjectedFailure: injected failure at step 3" in finished.output, finished.output[-4000:]
    crashed_at = float(re.search(r"injected failure at step 3 .*? at time (\d+\.\d+)", finished.output).group(1))
    assert finished.ended_at - crashed_at < 60, f"the job took {finished.ended_at - crashed_at:.0f}s to end"
    assert not (tmp_path / "out" / "config.json").exists()  # no model was saved by the surviving rank

    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in records if r.get("event") == "nonfinite_step_skipped"] == [2]
    step3 = [r for r in records if r.get("step") == 3 and "loss" in r and "event" not in r]
    assert step3 and math.isfinite(step3[0]["loss"]) and math.isfinite(step3[0]["grad_norm"])
