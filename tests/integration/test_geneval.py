"""Generation eval inside training, best model, early stopping and the forgetting probe (issue 15), on a tiny
config-built Llama. A user metric that replays a fixed score schedule (one value per eval) makes the "which eval
is best" decisions deterministic, whatever the random model generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easysft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from easysft.metrics import read_metrics
from easysft.training.loop import train

# The count of real calls lives in a file beside the metric, so it continues across a resume.
SCHEDULED_METRIC = '''
import os, pathlib
COUNT = pathlib.Path(__file__).with_suffix(".count")
def score(predictions, references, prompts):
    if predictions == ["a dry run"]:
        return {"scheduled": 0.0}
    calls = int(COUNT.read_text()) if COUNT.exists() else 0
    COUNT.write_text(str(calls + 1))
    schedule = [float(v) for v in os.environ["EASYSFT_TEST_SCORES"].split(",")]
    return {"scheduled": schedule[calls]}
'''


def run(model_dir, data_dir, out, lora_dim=0, **train_kwargs):
    train_kwargs.setdefault("tensorboard", False)
    return train(ModelConfig(model_name_or_path=model_dir), DataConfig(data_path=[data_dir], max_ans_len=8),
                 TrainConfig(output_dir=str(out), **train_kwargs), LoraConfig(lora_dim=lora_dim))


def scheduled(tmp_path, monkeypatch, scores) -> str:
    path = tmp_path / "scheduled_metric.py"
    path.write_text(SCHEDULED_METRIC, encoding="utf-8")
    monkeypatch.setenv("EASYSFT_TEST_SCORES", ",".join(map(str, scores)))
    return f"{path}:score"


def test_best_eval_is_the_final_model_and_survives_retention(tiny_model_dir, qa_data_dir, tmp_path, monkeypatch):
    metric = scheduled(tmp_path, monkeypatch, [0.1, 0.5, 0.9, 0.3, 0.2])
    out = tmp_path / "out"
    result = run(tiny_model_dir, qa_data_dir, out, max_steps=4, eval_steps=1, save_steps=1, save_total_limit=1,
                 eval_generate=2, eval_max_new_tokens=3, eval_metric=metric,
                 metric_for_best_model="scheduled", load_best_model_at_end=True, learning_rate=1e-2,
                 per_device_train_batch_size=4)
    assert result.steps == 4
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3, 4]
    assert [r["eval_scheduled"] for r in evals] == [0.1, 0.5, 0.9, 0.3, 0.2]
    for key in ("eval_exact_match", "eval_rouge_l", "eval_chrf", "eval_bleu"):
        assert all(isinstance(r[key], float) for r in evals), key
    rows = [json.loads(line) for line in (out / "eval_predictions" / "step-2.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "reference", "prediction"}
    assert_logged_scores_are_the_saved_predictions(out, evals)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-2", "step-4"]  # the limit keeps the newest; the best is never rotated away
    meta = json.loads((out / "easysft.json").read_text())
    assert meta["best_model"] == {"metric": "eval_scheduled", "greater_is_better": True, "best_step": 2,
                                  "best_value": 0.9}
    final, best = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoints/step-2/model.safetensors"))
    last = load_file(str(out / "checkpoints/step-4/model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert any(not torch.equal(last[k], best[k]) for k in best)  # and it is not simply the last step's weights
    assert meta["generation"]["repetition_penalty"] == 1.0 and meta["generation"]["do_sample"] is False


def assert_logged_scores_are_the_saved_predictions(out: Path, evals: list[dict]) -> None:
    """Every eval's logged generation metrics are easysft.scoring.score of the predictions it saved (not of the
    references against themselves): recomputed from eval_predictions/step-N.jsonl of the same eval."""
    from easysft.scoring import score

    differs = False
    for record in evals:
        path = out / "eval_predictions" / f"step-{record['step']}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        predictions = [r["prediction"] for r in rows]
        references = [r["reference"] for r in rows]
        differs |= predictions != references
        want = score(predictions, references, [r["prompt"] for r in rows])
        for name in ("exact_match", "rouge_l", "chrf", "bleu"):
            assert record[f"eval_{name}"] == pytest.approx(want[name], rel=1e-9, abs=1e-12), (record["step"], name)
    assert differs  # a random tiny model does not reproduce the references: the scores can tell them apart


def test_best_so_far_survives_a_resume(tiny_model_dir, qa_data_dir, tmp_path, monkeypatch):
    from easysft.testing_hooks import InjectedFailure

    metric = scheduled(tmp_path, monkeypatch, [0.1, 0.9, 0.3, 0.2, 0.5])
    out = tmp_path / "out"
    common = dict(max_steps=4, eval_steps=1, save_steps=1, save_total_limit=1, eval_generate=1,
                  eval_max_new_tokens=2, eval_metric=metric, metric_for_best_model="scheduled",
                  load_best_model_at_end=True, learning_rate=1e-2, per_device_train_batch_size=4)
    monkeypatch.setenv("EASYSFT_FAIL_AT_STEP", "3")
    with pytest.raises(InjectedFailure):
        run(tiny_model_dir, qa_data_dir, out, **common)  # evals at 0, 1 (best), 2; dies after step 3
    monkeypatch.delenv("EASYSFT_FAIL_AT_STEP")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    run(tiny_model_dir, qa_data_dir, out, resume="latest", **common)  # evals at 3 and 4 do not beat step 1
    meta = json.loads((out / "easysft.json").read_text())
    assert meta["best_model"]["best_step"] == 1 and meta["best_model"]["best_value"] == 0.9
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-4"]
    final, best = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoints/step-1/model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in best)


def test_early_stopping_stops_at_the_right_eval(tiny_model_dir, qa_data_dir, tmp_path, monkeypatch, capsys):
    metric = scheduled(tmp_path, monkeypatch, [0.1, 0.5, 0.4, 0.45, 0.9, 0.9, 0.9, 0.9, 0.9])
    out = tmp_path / "out"
    result = run(tiny_model_dir, qa_data_dir, out, max_steps=8, eval_steps=1, eval_generate=2,
                 eval_max_new_tokens=2, eval_metric=metric, metric_for_best_model="eval_scheduled",
                 early_stopping_patience=2, per_device_train_batch_size=4)
    assert result.steps == 3  # best at step 1; steps 2 and 3 do not improve: patience 2 is spent at step 3
    assert "early stopping at step 3: eval_scheduled did not improve" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-3" / "COMPLETE").is_file() and (out / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r] == [0, 1, 2, 3]


def test_probe_kl_is_zero_at_start_and_grows(tiny_model_dir, qa_data_dir, tmp_path):
    probe = tmp_path / "probe.txt"
    probe.write_text("The capital of France is Paris.\nWater boils at one hundred degrees.\n\nCats purr.\n")
    for lora_dim in (0, 4):
        out = tmp_path / f"out-{lora_dim}"
        # one step per epoch: an eval after every step
        run(tiny_model_dir, qa_data_dir, out, lora_dim=lora_dim, max_steps=3, probe_data=str(probe),
            learning_rate=5e-2, lr_scheduler_type="constant", per_device_train_batch_size=8)
        evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
        kls = [r["probe_kl"] for r in evals]
        assert [r["step"] for r in evals] == [0, 1, 2, 3]
        assert kls[0] == pytest.approx(0.0, abs=1e-6), lora_dim
        assert kls[3] > kls[1] > 1e-4, (lora_dim, kls)
        assert all(r["probe_nll"] > 0 for r in evals)
    assert (tmp_path / "out-0" / "loss.png").is_file()


def test_broken_metric_fails_before_anything_is_written(tiny_model_dir, qa_data_dir, tmp_path):
    from easysft.errors import ConfigError

    bad = tmp_path / "bad.py"
    bad.write_text("def score(predictions, references, prompts):\n    return {'x': None}\n")
    with pytest.raises(ConfigError, match=r"--eval_metric .*bad.py:score returned x=None"):
        run(tiny_model_dir, qa_data_dir, tmp_path / "out", max_steps=1, eval_generate=2, eval_metric=f"{bad}:score")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--metric_for_best_model eval_exact_match: not measured"):
        run(tiny_model_dir, qa_data_dir, tmp_path / "out2", max_steps=1, metric_for_best_model="exact_match")
    assert not Path(tmp_path / "out2").exists()  # the folder made for the failed run is removed again


def test_eval_command_generate_scores_one_json_line(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    from easysft.cli import main

    metric = tmp_path / "m.py"
    metric.write_text("def f(predictions, references, prompts):\n    return {'rows': float(len(predictions))}\n")
    assert main(["eval", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, "--generate", "3",
                 "--max_new_tokens", "2", "--eval_metric", f"{metric}:f"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert {"eval_loss", "eval_exact_match", "eval_rouge_l", "eval_chrf", "eval_bleu"} <= set(record)
    assert record["eval_rows"] == 3.0 and record["num_generated"] == 3
    metric.write_text("def f(predictions, references, prompts):\n    raise KeyError('oops')\n")
    assert main(["eval", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, "--generate", "3",
                 "--eval_metric", f"{metric}:f"]) == 2
    assert "easysft: error: --eval_metric" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_model_infer_with_no_flags_reproduces_the_demo(tmp_path):
    """The demo (a short run) saves the settings its generation eval measured with: `easysft infer` on its model
    with no generation flag writes the same predictions, hence the same exact match, as the demo reported."""
    from easysft.cli import main
    from easysft.demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["--output_dir", str(out), "--max_steps", "2", "--num_eval", "4"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    reported = [json.loads(line) for line in (out / "model/eval_predictions/step-2.jsonl").read_text().splitlines()]
    assert main(["infer", "--model_name_or_path", str(out / "model"), "--data_path", str(out / "data"),
                 "--inference_output_path", str(tmp_path / "preds.jsonl"), "--output_format", "jsonl"]) == 0
    inferred = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["prediction"].strip() for r in inferred] == [r["prediction"] for r in reported]
    hits = sum(r["prediction"].strip() == r["answer"] for r in inferred) / len(inferred)
    assert hits == summary["after"]["exact_match"]
