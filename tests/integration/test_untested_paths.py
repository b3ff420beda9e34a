"""Paths no other test ran (issue 19): the public API after every submodule is imported, gradient checkpointing,
--group_by_length inside the loop, `train --debug`, infer on a trained LoRA adapter, chat history, eval/infer
--dtype. Each test fails when its path is broken (the note of issue 19 lists what was broken to check)."""

from __future__ import annotations

import csv
import importlib
import json
import pkgutil
from pathlib import Path

import pytest
import torch

import easysft
from easysft.cli import main
from easysft.config import DataConfig, ModelConfig, TrainConfig
from tests.conftest import QA_ROWS

TINY = dict(per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, tensorboard=False)
GREEDY = ["--do_sample", "false", "--max_new_tokens", "6", "--repetition_penalty", "1.0"]
OPTIONAL = ("vllm", "dashboard")  # need packages the test environment does not install


def test_public_api_after_importing_every_submodule_twice_in_one_process(tiny_model_dir, qa_data_dir, tokenizer,
                                                                         tmp_path):
    """Importing ``easysft.training`` etc. must not shadow ``easysft.train`` / ``easysft.evaluate``; the README's
    Python API example runs twice in one process (no global state left behind by the first run)."""
    for info in pkgutil.walk_packages(easysft.__path__, "easysft."):
        if not any(part in info.name for part in OPTIONAL) and info.name != "easysft.__main__":
            importlib.import_module(info.name)
    assert callable(easysft.train) and callable(easysft.evaluate)
    losses = []
    for attempt in range(2):
        rows = easysft.load_examples(qa_data_dir, split="train")
        sample = easysft.tokenize_example(tokenizer, rows[0].prompt, rows[0].answer, max_prompt_len=32,
                                          max_ans_len=16, template="qa")
        batch = easysft.collate([sample], pad_token_id=tokenizer.pad_token_id)
        assert batch["labels"].shape == batch["input_ids"].shape
        result = easysft.train(ModelConfig(tiny_model_dir), DataConfig(data_path=[qa_data_dir]),
                               TrainConfig(output_dir=str(tmp_path / f"run{attempt}"), **TINY))
        assert isinstance(result, easysft.TrainResult) and len(result.losses) == 2
        assert isinstance(result.final_eval, easysft.EvalResult)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"run{attempt}")
        ev = easysft.evaluate(model, [sample], pad_token_id=tokenizer.pad_token_id)
        assert isinstance(ev, easysft.EvalResult) and ev.num_tokens == sum(t != -100 for t in sample["labels"])
        losses.append(result.losses)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # same seed, same curve: nothing leaked between runs


def test_gradient_checkpointing_alone_and_with_lean_activations(tiny_model_dir, qa_data_dir, tmp_path, monkeypatch):
    """Both recompute every decoder layer and train the curve of the plain run (unpacked batches; this also checks
    lean == plain activations without packing)."""
    import transformers.modeling_utils as ckpt  # activation_checkpointing_enable binds this name

    calls = []
    real = ckpt.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting)
    runs = {}
    for name, flags in {"plain": dict(lean_activations=False), "gc": dict(lean_activations=False,
                        gradient_checkpointing=True), "gc_lean": dict(gradient_checkpointing=True)}.items():
        before = len(calls)
        runs[name] = easysft.train(ModelConfig(tiny_model_dir), DataConfig(data_path=[qa_data_dir]),
                                   TrainConfig(output_dir=str(tmp_path / name), **dict(TINY, max_steps=3), **flags))
        recomputed = len(calls) - before
        assert recomputed == (0 if name == "plain" else 3 * 2), (name, recomputed)  # 3 forwards x 2 layers
    for name in ("gc", "gc_lean"):
        assert runs[name].losses == pytest.approx(runs["plain"].losses, abs=1e-5), name


def test_group_by_length_batches_similar_lengths_inside_the_loop(tiny_model_dir, tmp_path, monkeypatch):
    from easysft.training.run import Run

    rows = [{"prompt": "word " * n, "answer": "ok " * (n % 3 + 1)} for n in (1, 20, 2, 21, 3, 22, 4, 23)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(rows))
    (data / "eval.json").write_text(json.dumps(QA_ROWS[:2]))
    padding: dict[bool, int] = {True: 0, False: 0}
    real = Run.make_batch

    def measure(self, indices):
        batch = real(self, indices)
        padding[self.train_cfg.group_by_length] += int((batch["attention_mask"] == 0).sum())
        return batch

    monkeypatch.setattr(Run, "make_batch", measure)
    for grouped in (False, True):
        easysft.train(ModelConfig(tiny_model_dir), DataConfig(data_path=[str(data)], max_prompt_len=64),
                      TrainConfig(output_dir=str(tmp_path / f"g{grouped}"), group_by_length=grouped,
                                  packing=False, **dict(TINY, max_steps=4)))  # padded batches, both runs
    assert padding[True] < padding[False] / 2, padding


def test_train_debug_shows_a_sample_and_stops_early(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--debug", "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir,
                 "--output_dir", str(out), "--per_device_train_batch_size", "1", "--num_train_epochs", "3",
                 "--tensorboard", "false"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "sample 0 (supervised span in [[ ]]):" in text
    # the debug view renders the first training sample with its answer marked as the supervised span
    assert any(f"Q: {row['prompt']} A: [[{row['answer']}" in text for row in QA_ROWS), text[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line and '"eval_loss"' not in line]
    assert steps[-1] == 8  # 3 epochs x 8 rows would be 24 steps: --debug stops after 8


def _predictions(model, data, out: Path, *extra) -> list[str]:
    assert main(["infer", "--model_name_or_path", str(model), "--data_path", data, "--inference_output_path",
                 str(out), "--template", "qa", *GREEDY, *extra]) == 0
    with open(out, encoding="utf-8", newline="") as handle:
        return [row["prediction"] for row in csv.DictReader(handle)]


def test_infer_on_a_trained_lora_adapter(tiny_model_dir, qa_data_dir, tmp_path):
    """The adapter changes the predictions (it trained), and infer on the adapter equals infer on the merged
    export (the adapter really is applied at generation time)."""
    adapter = tmp_path / "adapter"
    easysft.train(ModelConfig(tiny_model_dir), DataConfig(data_path=[qa_data_dir]),
                  TrainConfig(output_dir=str(adapter), **dict(TINY, max_steps=8, learning_rate=3e-2)),
                  easysft.config.LoraConfig(lora_dim=8))
    assert (adapter / "adapter_config.json").is_file()
    assert main(["export", "--model_name_or_path", str(adapter), "--merge", "--output_dir",
                 str(tmp_path / "merged")]) == 0
    base = _predictions(tiny_model_dir, qa_data_dir, tmp_path / "base.csv")
    tuned = _predictions(adapter, qa_data_dir, tmp_path / "adapter.csv")
    merged = _predictions(tmp_path / "merged", qa_data_dir, tmp_path / "merged.csv")
    assert tuned != base
    assert tuned == merged


def test_chat_history_changes_the_second_turn(tokenizer, tiny_model):
    from easysft.chat import ChatSession
    from easysft.generate import resolve_settings

    settings = resolve_settings({}, tokenizer, {"template": "chat", "do_sample": False, "max_new_tokens": 3})
    talked = ChatSession(tiny_model.eval(), tokenizer, settings)
    first = talked.reply("My name is Ada.")
    fresh = ChatSession(tiny_model, tokenizer, settings)
    with_history, without = talked.prompt_ids("What is my name?"), fresh.prompt_ids("What is my name?")
    text = tokenizer.decode(with_history)
    assert "My name is Ada." in text and (first in text) and "My name is Ada." not in tokenizer.decode(without)
    with torch.no_grad():  # the model sees a different context: its next-token distribution differs
        a = tiny_model(torch.tensor([with_history])).logits[0, -1]
        b = tiny_model(torch.tensor([without])).logits[0, -1]
    assert not torch.allclose(a, b)


def test_eval_and_infer_dtype_is_used(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    losses = {}
    for dtype in ("fp32", "bf16", None):  # None: the default, --dtype auto (fp32 on this CPU machine)
        assert main(["eval", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, "--template", "qa",
                     *(["--dtype", dtype] if dtype else [])]) == 0
        losses[dtype] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses[None] == losses["fp32"]

    from easysft.models import load as load_module

    seen = []
    real = load_module.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(next(model.parameters()).dtype)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(load_module, "load_model", spy)
        _predictions(tiny_model_dir, qa_data_dir, tmp_path / "bf16.csv", "--dtype", "bf16")
    assert seen == [torch.bfloat16], seen
