"""bench/bench_gpu.py stays runnable without a GPU: ``--smoke`` drives the trainer processes of the H200 job (TRL
defaults and easysft defaults; the third, easysft ``--gradient_checkpointing``, is the same worker with one more
flag and is left out to keep the suite short) through the same code on a tiny Llama.

The H200 run (bench/gpu_check.sh) can only happen in a session lent a device, so this is what keeps its code from
rotting between such sessions: every worker must finish, both must see the same samples in the same steps (the
premise of the side-by-side), and easysft's loss after the last step must match TRL's within the issue's 1%.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from bench.bench_gpu import RUNS, Job, main  # noqa: E402

pytestmark = pytest.mark.slow  # two training processes (TRL, easysft): about 45 s on 2 cores
SIDES = ("trl", "easysft")


def test_smoke_run_trains_both_sides_on_the_same_samples_to_the_same_loss(tmp_path, capsys):
    results = tmp_path / "gpu.md"
    assert main(["--smoke", "--work", str(tmp_path), "--results", str(results), "--only", *SIDES]) == 0, \
        capsys.readouterr().out
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in SIDES}
    steps = Job.smoke().steps
    for name, run in runs.items():
        assert len(run["step_seconds"]) == steps and len(run["step_tokens"]) == steps, name
        assert all(seconds > 0 for seconds in run["step_seconds"]), name
    # Same real (non-padding) tokens in every step: TRL and easysft read the same samples in the same order.
    assert runs["easysft"]["step_tokens"] == runs["trl"]["step_tokens"]
    assert runs["easysft"]["loss"] == pytest.approx(runs["trl"]["loss"], rel=0.01)
    table = results.read_text()
    assert "failed" not in table
    assert all(RUNS[name] in table for name in SIDES)
    assert "matmul peak" in table and "6N-MFU" in table
