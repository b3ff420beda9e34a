"""The single-process training loop on a tiny config-built Llama (issue 3's "Done when")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easysft.config import DataConfig, ModelConfig, TrainConfig
from easysft.data.dataset import prepare_data
from easysft.data.tokenize import IGNORE_INDEX
from easysft.evaluation import evaluate
from easysft.training.loop import train


def run(model_dir, data_dir, out, **train_kwargs):
    data_kwargs = {k: train_kwargs.pop(k) for k in list(train_kwargs) if k in ("max_prompt_len", "max_ans_len",
                                                                              "template")}
    train_kwargs.setdefault("tensorboard", False)
    return train(
        ModelConfig(model_name_or_path=model_dir),
        DataConfig(data_path=[data_dir], **data_kwargs),
        TrainConfig(output_dir=str(out), **train_kwargs),
    )


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_overfit_eight_rows_and_every_parameter_changes(tiny_model_dir, qa_data_dir, tmp_path):
    result = run(tiny_model_dir, qa_data_dir, tmp_path / "out", per_device_train_batch_size=8, max_steps=60,
                 learning_rate=1e-2, lr_scheduler_type="constant", num_warmup_steps=0, max_grad_norm=0)
    assert result.losses[-1] < 0.1 * result.losses[0], result.losses[::10]
    before, after = weights(tiny_model_dir), weights(tmp_path / "out")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, unchanged


def test_accumulation_invariance_batch4_equals_batch1_times_4(tiny_model_dir, qa_data_dir, tmp_path):
    common = dict(max_steps=2, learning_rate=1e-3, lr_scheduler_type="linear", num_warmup_steps=1, seed=7)
    a = run(tiny_model_dir, qa_data_dir, tmp_path / "a", per_device_train_batch_size=4,
            gradient_accumulation_steps=1, **common)
    b = run(tiny_model_dir, qa_data_dir, tmp_path / "b", per_device_train_batch_size=1,
            gradient_accumulation_steps=4, **common)
    c = run(tiny_model_dir, qa_data_dir, tmp_path / "c", per_device_train_batch_size=2,
            gradient_accumulation_steps=2, **common)
    for other in (b, c):
        assert other.losses == pytest.approx(a.losses, abs=1e-5)
    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(wc[name], wa[name], atol=1e-5, rtol=0, msg=name)


def test_memory_savers_change_no_numbers(tiny_model_dir, qa_data_dir, tmp_path, monkeypatch):
    """The default lean activations and malloc_trim hooks are installed by train() and train the same model as
    plain transformers modules without trimming (losses and weights within 1e-5)."""
    from easysft.kernels import lean_ops, memory

    installed = {}
    for module, name in ((lean_ops, "apply_lean_ops"), (memory, "release_freed_memory")):
        real = getattr(module, name)

        def spy(model, _real=real, _name=name, **options):
            installed[_name] = _real(model, **options)
            return installed[_name]

        monkeypatch.setattr(module, name, spy)  # the engines import both lazily, from these modules
    common = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, seed=3, packing=True)
    lean = run(tiny_model_dir, qa_data_dir, tmp_path / "lean", **common)
    assert installed["apply_lean_ops"] == 8 and len(installed["release_freed_memory"]) >= 1
    installed.clear()
    plain = run(tiny_model_dir, qa_data_dir, tmp_path / "plain", lean_activations=False, release_cpu_memory=False,
                **common)
    assert not installed  # switched off: neither is installed
    assert plain.losses == pytest.approx(lean.losses, abs=1e-5)
    w_lean, w_plain = weights(tmp_path / "lean"), weights(tmp_path / "plain")
    for name in w_plain:
        torch.testing.assert_close(w_lean[name], w_plain[name], atol=1e-5, rtol=0, msg=name)


def test_same_seed_same_curve_other_seed_other_curve(tiny_model_dir, qa_data_dir, tmp_path):
    common = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3)
    a = run(tiny_model_dir, qa_data_dir, tmp_path / "a", seed=3, **common)
    b = run(tiny_model_dir, qa_data_dir, tmp_path / "b", seed=3, **common)
    c = run(tiny_model_dir, qa_data_dir, tmp_path / "c", seed=4, **common)
    assert a.losses == b.losses
    assert a.eval_history == b.eval_history
    assert a.losses != c.losses


def test_perplexity_is_exp_of_token_weighted_nll(tokenizer, tiny_model, qa_data_dir):
    data = prepare_data(DataConfig(data_path=[qa_data_dir]), tokenizer)
    result = evaluate(tiny_model, data.eval, batch_size=3, pad_token_id=tokenizer.pad_token_id)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for sample in data.eval:  # one at a time, full logits, float64 -- no shared code with evaluate()
            logits = tiny_model(input_ids=torch.tensor([sample["input_ids"]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(sample["input_ids"]) - 1):
                target = sample["labels"][t + 1]
                if target != IGNORE_INDEX:
                    total_nll -= float(logp[t, target])
                    total_tokens += 1
    assert result.num_tokens == total_tokens
    assert result.loss == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)


def test_output_folder_is_a_plain_hf_checkpoint_with_logs(tiny_model_dir, qa_data_dir, tmp_path, tokenizer):
    out = tmp_path / "out"
    result = train(ModelConfig(model_name_or_path=tiny_model_dir), DataConfig(data_path=[qa_data_dir]),
                   TrainConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, eval_steps=2))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "easysft.json",
                 "metrics.jsonl", "train_config.json", "data_report.json", "loss.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir()), "no TensorBoard event file"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for r in train_records:
        assert {"step", "epoch", "loss", "lr", "num_tokens", "tokens_per_s"} <= r.keys()
    assert [r["step"] for r in eval_records] == [0, 2, 3]
    for r in eval_records:
        assert {"step", "eval_loss", "eval_ppl"} <= r.keys()
    meta = json.loads((out / "easysft.json").read_text())
    assert meta["template"]["format"] == "Q: {prompt} A: " and meta["max_ans_len"] == 256

    # Reloaded with plain transformers, the model scores the eval set exactly as the run's final eval did.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    data = prepare_data(DataConfig(data_path=[qa_data_dir]), tokenizer)
    again = evaluate(reloaded, data.eval, pad_token_id=tokenizer.pad_token_id)
    assert again.loss == pytest.approx(result.final_eval.loss, abs=1e-5)
    assert again.loss == pytest.approx(eval_records[-1]["eval_loss"], abs=1e-5)


def test_refuses_used_output_dir_unless_overwrite(tiny_model_dir, qa_data_dir, tmp_path):
    from easysft.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("another run")
    with pytest.raises(ConfigError, match="not empty"):
        run(tiny_model_dir, qa_data_dir, out, max_steps=1)
    run(tiny_model_dir, qa_data_dir, out, max_steps=1, overwrite_output_dir=True)
    assert (out / "model.safetensors").is_file()


def test_schedulers_and_warmup(tiny_model_dir, qa_data_dir, tmp_path):
    result = run(tiny_model_dir, qa_data_dir, tmp_path / "o", max_steps=4, per_device_train_batch_size=2,
                 learning_rate=1e-3, lr_scheduler_type="linear", num_warmup_steps=2)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    # The LR each step USED: linear warmup from 0 over 2 steps, then linear decay to 0 at step 4.
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4], abs=1e-12)
    assert result.steps == 4
