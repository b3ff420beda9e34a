"""Packed training end to end on a tiny model: the same curve as padded training, deterministic, and the
default packing packs each unpacked micro-batch (moved from tests/unit: these train)."""

from __future__ import annotations

import json

import pytest
import torch

ROWS = [("short?", "yes"), ("a much longer prompt with many more words in it", "an answer of some length"),
        ("mid prompt", "mid"), ("Reverse the words: red green blue", "blue green red")]


def _train(model_dir, data_dir, out, chat_template=None, **train_kwargs):
    from easysft.config import DataConfig, ModelConfig, TrainConfig
    from easysft.training.loop import train

    data = DataConfig(data_path=[data_dir], template="chat" if chat_template else "qa")
    return train(ModelConfig(model_name_or_path=model_dir, chat_template=chat_template), data,
                 TrainConfig(output_dir=str(out), tensorboard=False, **train_kwargs))


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


@pytest.mark.slow  # three short training runs
def test_packed_training_equals_padded_training_on_the_same_samples(tiny_model_dir, qa_data_dir, tmp_path):
    """Full-batch steps (every step sees all 8 rows): padded batch 8 == one packed row == small packed rows
    accumulated. So packing changes neither the loss math nor the accumulation invariance (rules 3 and 5)."""
    common = dict(max_steps=3, learning_rate=1e-3, lr_scheduler_type="linear", num_warmup_steps=1, seed=7)
    padded = _train(tiny_model_dir, qa_data_dir, tmp_path / "padded", per_device_train_batch_size=8, **common)
    one_row = _train(tiny_model_dir, qa_data_dir, tmp_path / "one_row", packing=True, packing_max_tokens=4096,
                     **common)
    # ~5 rows of <= 40 tokens per epoch; accumulating 8 micro-batches takes the whole epoch in one step.
    rows = _train(tiny_model_dir, qa_data_dir, tmp_path / "rows", packing=True, packing_max_tokens=40,
                  gradient_accumulation_steps=8, **common)
    metrics = [json.loads(line) for line in open(tmp_path / "rows" / "metrics.jsonl") if '"loss"' in line]
    assert metrics[0]["total_tokens"] == json.loads(
        next(line for line in open(tmp_path / "padded" / "metrics.jsonl") if '"loss"' in line))["total_tokens"]
    for other in (one_row, rows):
        assert other.losses == pytest.approx(padded.losses, abs=1e-5)
    reference = _weights(tmp_path / "padded")
    for name in ("one_row", "rows"):
        got = _weights(tmp_path / name)
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")


@pytest.mark.slow  # two short training runs
def test_packed_training_is_deterministic(tiny_model_dir, qa_data_dir, tmp_path):
    kwargs = dict(max_steps=4, learning_rate=1e-3, seed=3, packing=True, packing_max_tokens=48,
                  gradient_accumulation_steps=2)
    a = _train(tiny_model_dir, qa_data_dir, tmp_path / "a", **kwargs)
    b = _train(tiny_model_dir, qa_data_dir, tmp_path / "b", **kwargs)
    assert a.losses == b.losses and len(a.losses) == 4


@pytest.mark.parametrize("data", ["qa", "tool conversations"])
def test_default_packing_packs_each_unpacked_micro_batch(data, tiny_model_dir, qa_data_dir, tool_data_file, tmp_path):
    """Without --packing_max_tokens, step k packs exactly the samples of unpacked step k: same per-step losses
    and weights as padded training with batch 2 (a real shuffle, 4 steps), with no padding token processed; for
    prompt/answer rows and for multi-turn tool-calling conversations (one sample each, every turn supervised)."""
    common = dict(max_steps=4, learning_rate=1e-3, seed=5, per_device_train_batch_size=2)
    if data != "qa":
        qa_data_dir, common["chat_template"] = tool_data_file
    padded = _train(tiny_model_dir, qa_data_dir, tmp_path / "padded", **common)
    packed = _train(tiny_model_dir, qa_data_dir, tmp_path / "packed", packing=True, **common)
    assert packed.losses == pytest.approx(padded.losses, abs=1e-5)
    reference = _weights(tmp_path / "padded")
    got = _weights(tmp_path / "packed")
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=0, msg=key)
