"""LoRA end to end on a tiny Llama: train, save the adapter, export --merge, reload, eval (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import easysft.models.lora
import easysft.training.loop
from easysft.cli import main
from easysft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from easysft.models.load import load_model, resolve_model_path
from easysft.training.loop import train

PROMPT = "Reverse the words: red green blue"


def _train_capturing(monkeypatch, model_dir, data_dir, out, lora_cfg, **train_kwargs):
    """Run train() and capture the model's state right after LoRA was applied and right before the final save."""
    seen: dict = {}
    real_apply, real_save = easysft.models.lora.apply_lora, easysft.training.loop.save_model_folder

    def apply_lora(model, cfg):
        seen["base_before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        peft_model = real_apply(model, cfg)
        seen["lora_before"] = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
        return peft_model

    def save_model_folder(model, tokenizer, output_dir, **kwargs):
        seen["after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["model"] = model
        return real_save(model, tokenizer, output_dir, **kwargs)

    monkeypatch.setattr(easysft.models.lora, "apply_lora", apply_lora)
    monkeypatch.setattr(easysft.training.loop, "save_model_folder", save_model_folder)
    train_kwargs = dict(per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                        lr_scheduler_type="constant", max_grad_norm=0, tensorboard=False) | train_kwargs
    result = train(ModelConfig(model_name_or_path=model_dir), DataConfig(data_path=[data_dir]),
                   TrainConfig(output_dir=str(out), **train_kwargs), lora_cfg)
    monkeypatch.undo()
    return result, seen


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One LoRA run (r=4 on every linear layer, 4 steps) shared by the tests below."""
    from conftest import write_qa_folder

    root = tmp_path_factory.mktemp("lora-run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("EASYSFT_DATA_CACHE", str(root / "data-cache"))
        data_dir = write_qa_folder(root / "data")
        result, seen = _train_capturing(monkeypatch, tiny_model_dir, data_dir, root / "adapter",
                                        LoraConfig(lora_dim=4, lora_module_name="all-linear"))
    return {"adapter": root / "adapter", "data": data_dir, "result": result, **seen}


def _logits(model, tokenizer, prompt=PROMPT):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_folder_is_peft_format_with_tokenizer_and_meta(lora_run, tiny_model_dir):
    folder = lora_run["adapter"]
    names = set(p.name for p in folder.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "easysft.json", "tokenizer.json"} <= names
    assert not {"config.json", "model.safetensors"} & names  # the adapter only: no copy of the base
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert json.loads((folder / "easysft.json").read_text())["template"]
    resolved = resolve_model_path(str(folder))
    assert resolved.adapter_path == str(folder) and resolved.path == str(Path(tiny_model_dir).resolve())
    assert lora_run["result"].losses[-1] < lora_run["result"].losses[0]


def test_base_weights_bitwise_unchanged_and_every_lora_parameter_changes(lora_run):
    before, after = lora_run["base_before"], lora_run["after"]
    for name, value in before.items():
        # PEFT renames wrapped layers: x.q_proj.weight -> base_model.model.x.q_proj.base_layer.weight
        candidates = [f"base_model.model.{name}",
                      f"base_model.model.{name.rsplit('.', 1)[0]}.base_layer.{name.rsplit('.', 1)[1]}"]
        key = next(k for k in candidates if k in after)
        assert torch.equal(after[key], value), name
    lora_before = lora_run["lora_before"]
    assert len(lora_before) == 2 * 14  # A and B on 14 linear layers
    unchanged = [k for k, v in lora_before.items() if torch.equal(after[k], v)]
    assert not unchanged, unchanged
    saved = load_file(str(lora_run["adapter"] / "adapter_model.safetensors"))
    assert len(saved) == len(lora_before)
    for key, value in saved.items():  # saved names drop the adapter name: ...lora_A.weight
        torch.testing.assert_close(value, after[key.replace(".weight", ".default.weight")], atol=0, rtol=0)


def test_export_merge_reloads_with_plain_transformers_and_gives_the_adapter_logits(lora_run, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["export", "--model_name_or_path", str(lora_run["adapter"]), "--merge",
                 "--output_dir", str(out)]) == 0
    names = set(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "easysft.json"} <= names
    assert "adapter_config.json" not in names
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    resolved = resolve_model_path(str(lora_run["adapter"]))
    adapter_model = load_model(resolved.path, adapter_path=resolved.adapter_path)
    adapter_logits = _logits(adapter_model, tokenizer)
    assert (_logits(merged, tokenizer) - adapter_logits).abs().max() < 1e-4
    assert (_logits(lora_run["model"], tokenizer) - adapter_logits).abs().max() < 1e-5  # save/reload round trip
    assert json.loads((out / "easysft.json").read_text())["template"] == \
        json.loads((lora_run["adapter"] / "easysft.json").read_text())["template"]


def test_eval_accepts_an_adapter_folder_and_a_merged_one(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--model_name_or_path", str(lora_run["adapter"]), "--merge",
                 "--output_dir", str(out)]) == 0
    capsys.readouterr()
    scores = []
    for folder in (lora_run["adapter"], out):
        assert main(["eval", "--model_name_or_path", str(folder), "--data_path", lora_run["data"]]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0]["num_tokens"] == scores[1]["num_tokens"] > 0
    assert scores[0]["eval_loss"] == pytest.approx(scores[1]["eval_loss"], abs=1e-4)
    assert scores[0]["eval_loss"] == pytest.approx(lora_run["result"].final_eval.loss, abs=1e-4)


def test_export_refuses_a_used_folder_and_resaves_full_checkpoints(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    assert main(["export", "--model_name_or_path", tiny_model_dir, "--merge", "--output_dir", str(out)]) == 0
    assert "no adapter to merge" in capsys.readouterr().out
    a, b = load_file(str(Path(tiny_model_dir) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert main(["export", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "\n" not in err


def test_only_optimize_lora_false_trains_the_base_too_and_saves_merged(tiny_model_dir, qa_data_dir, tmp_path,
                                                                      monkeypatch, capsys, tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _, seen = _train_capturing(monkeypatch, tiny_model_dir, qa_data_dir, out,
                               LoraConfig(lora_dim=2, lora_module_name="q_proj,v_proj", only_optimize_lora=False),
                               max_steps=2, learning_rate=1e-3)
    printed = capsys.readouterr().err  # print0 writes to stderr
    assert "LoRA r=2" in printed and "base weights also train" in printed
    names = set(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "adapter_config.json" not in names
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert (_logits(reloaded, tokenizer) - _logits(seen["model"], tokenizer)).abs().max() < 1e-4


def test_bad_lora_module_name_is_one_line_exit_2(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    code = main(["train", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, "--output_dir",
                 str(tmp_path / "out"), "--lora_dim", "4", "--lora_module_name", "query_key", "--max_steps", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # skip progress bars
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("easysft: error: --lora_module_name")
    assert "query_key" in errors[0] and "q_proj" in errors[0]


def test_lora_run_stopped_and_resumed_ends_with_the_same_adapter(tiny_model_dir, qa_data_dir, tmp_path, monkeypatch):
    from easysft.training import signals

    def run(out, **kwargs):
        return train(ModelConfig(model_name_or_path=tiny_model_dir), DataConfig(data_path=[qa_data_dir]),
                     TrainConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                                 lr_scheduler_type="linear", tensorboard=False, save_steps=2, **kwargs),
                     LoraConfig(lora_dim=2, lora_module_name="q_proj,v_proj"))

    full = run(tmp_path / "full")
    monkeypatch.setenv("EASYSFT_STOP_AFTER_STEP", "3")
    with pytest.raises(signals.Preempted):
        run(tmp_path / "stopped")
    monkeypatch.delenv("EASYSFT_STOP_AFTER_STEP")
    resumed = run(tmp_path / "stopped", resume="latest")
    assert resumed.losses[-1] == pytest.approx(full.losses[-1], abs=1e-6)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
