"""A training run on a weighted mix of sources through the CLI (the data-level mixing rules are unit tests in
tests/unit/test_data_scale.py)."""

from __future__ import annotations

import json

from easysft.cli import main
from tests.unit.test_data_scale import jsonl_source


def test_training_with_data_weights_prints_the_mix_and_draws_it(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    """A short CLI run: the start-up lines show the mix, and the steps hold the mixed epoch's sample count."""
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, jsonl_source(tmp_path),
            "--data_weights", "1", "1", "--mixing", "upsample", "--output_dir", str(out),
            "--per_device_train_batch_size", "16", "--max_ans_len", "16", "--tensorboard", "false"]
    assert main(argv) == 0
    assert "data mixing (upsample)" in capsys.readouterr().err  # start-up lines go to stderr
    # qa folder: 8 train samples; the JSONL: 36 train samples after hold-out and skips -> upsample to 36 + 36.
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    drawn = [s["drawn_per_epoch"] for s in report["mixing"]["sources"]]
    assert drawn[0] == drawn[1] == max(s["kept"] for s in report["mixing"]["sources"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in steps if "loss" in m) == -(-sum(drawn) // 16)  # one epoch of the mix
