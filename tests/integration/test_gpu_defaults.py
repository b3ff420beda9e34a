"""On a CUDA GPU the commands' defaults take the GPU fast path (run by bench/gpu_check.sh on the lent H200):
``--dtype auto`` trains with bf16 autocast and ``easysft eval`` scores on the GPU in bf16, both within bf16
tolerance of the fp32 result. Without CUDA these skip (the CPU side of ``auto`` is in test_cli_train.py and
test_untested_paths.py)."""

from __future__ import annotations

import json

import pytest
import torch

from easysft.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _train(model_dir: str, data_dir: str, out, *extra: str) -> list[float]:
    assert main(["train", "--model_name_or_path", model_dir, "--data_path", data_dir, "--output_dir", str(out),
                 "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                 "--tensorboard", "false", *extra]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if "loss" in r]


def test_default_training_is_bf16_autocast_and_matches_fp32(tiny_model_dir, qa_data_dir, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    default = _train(tiny_model_dir, qa_data_dir, tmp_path / "default")
    fp32 = _train(tiny_model_dir, qa_data_dir, tmp_path / "fp32", "--dtype", "fp32")
    assert json.loads((tmp_path / "default" / "train_config.json").read_text())["dtype"] == "bf16"
    assert default != fp32 and default == pytest.approx(fp32, rel=2e-2)


def test_eval_runs_on_the_gpu_by_default(tiny_model_dir, qa_data_dir, capsys):
    losses = {}
    for flags in ([], ["--dtype", "fp32"]):
        torch.cuda.reset_peak_memory_stats()
        assert main(["eval", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, "--template", "qa",
                     *flags]) == 0
        assert torch.cuda.max_memory_allocated() > 0  # the model and batches went to the GPU
        losses[tuple(flags)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"]
    assert losses[()] == pytest.approx(losses[("--dtype", "fp32")], rel=2e-2)
