"""Issue 18 on CPU: QLoRA (bitsandbytes 4-bit / 8-bit base weights), the low-bit optimizers and their exact resume,
activation offload, the memory gate and the out-of-memory line. Tiny Llamas; bitsandbytes and torchao both run
these paths on CPU, so nothing here is GPU-only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easysft import checkpoint
from easysft.cli import main
from easysft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from easysft.errors import ConfigError
from easysft.training.loop import train
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tokenizer):
    """hidden 128 / MLP 256: LoRA r=32 matrices have >= 4096 entries, so the 8-/4-bit optimizers really quantize
    their state (both keep smaller tensors in fp32)."""
    folder = tmp_path_factory.mktemp("tiny-llama-wide")
    make_tiny_model(tokenizer, hidden_size=128, intermediate_size=256).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


WIDE_LORA = LoraConfig(lora_dim=32, lora_module_name="q_proj,down_proj")


def _run(model_dir, data_dir, out, *, lora=WIDE_LORA, quantization="none", **train_kwargs):
    kwargs = dict(per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2, lr_scheduler_type="linear",
                  tensorboard=False) | train_kwargs
    return train(ModelConfig(model_name_or_path=model_dir), DataConfig(data_path=[data_dir]),
                 TrainConfig(output_dir=str(out), quantization=quantization, **kwargs), lora)


@pytest.mark.parametrize("optim,quantized_state", [("adamw_8bit", torch.uint8), ("adamw_4bit", "OptimState4bit")])
def test_low_bit_optimizer_trains_and_resumes_bit_identically(optim, quantized_state, wide_model_dir, qa_data_dir,
                                                             tmp_path, monkeypatch):
    from easysft.training import signals

    full = _run(wide_model_dir, qa_data_dir, tmp_path / "full", optim=optim)
    assert full.losses[-1] < full.losses[0]
    monkeypatch.setenv("EASYSFT_STOP_AFTER_STEP", "2")
    with pytest.raises(signals.Preempted):
        _run(wide_model_dir, qa_data_dir, tmp_path / "stopped", optim=optim)
    monkeypatch.delenv("EASYSFT_STOP_AFTER_STEP")
    state = checkpoint.load_torch_state(checkpoint.step_dir(tmp_path / "stopped", 2) / "optimizer.pt")["state"]
    # bitsandbytes nests its quantized tensors one level down; torchao's are tensor subclasses.
    values = [w for s in state.values() for v in s.values() for w in (v.values() if isinstance(v, dict) else [v])]
    kinds = {v.dtype if type(v) is torch.Tensor else type(v).__name__ for v in values if isinstance(v, torch.Tensor)}
    assert quantized_state in kinds, kinds  # the state really is low-bit (and loads with weights_only=True)
    resumed = _run(wide_model_dir, qa_data_dir, tmp_path / "stopped", optim=optim, resume="latest")
    assert resumed.losses == full.losses
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_lora_trains_and_the_adapter_loads_on_both_bases(quantization, wide_model_dir, qa_data_dir,
                                                                   tmp_path, tokenizer, capsys):
    from easysft.models.load import load_model
    from easysft.models.quantize import count_quantized_layers

    result = _run(wide_model_dir, qa_data_dir, tmp_path / "qlora", quantization=quantization, max_steps=4,
                  lora=LoraConfig(lora_dim=8))
    assert ("linear layers in NF4" if quantization == "4bit" else "in LLM.int8") in capsys.readouterr().err
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    adapter = tmp_path / "qlora"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    # lora_B starts at zero: every B is non-zero only if gradients flowed through the quantized layers below it.
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    ids = tokenizer("Reverse the words: red green blue", return_tensors="pt").input_ids
    effect = {}  # (base + adapter) - base, on each base
    for name, quant in (("plain", "none"), ("quantized", quantization)):
        model = load_model(wide_model_dir, adapter_path=str(adapter), quantization=quant)
        assert (count_quantized_layers(model) > 0) == (quant != "none")
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(saved) > 0
        for key, value in saved.items():  # PEFT drops the adapter name in the file
            match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
            assert match and torch.equal(match[0].float(), value.float()), key
        base = load_model(wide_model_dir, quantization=quant)
        with torch.no_grad():
            effect[name] = model(input_ids=ids).logits.float() - base(input_ids=ids).logits.float()
    # The adapter moves the model, and moves it the same way on the quantized base as on the plain one, up to the
    # quantization noise of the base layers it runs through. Measured, relative to the effect's size: 0.13-0.20 for
    # NF4 (8 seeds), 0.03-0.04 for LLM.int8; an adapter switched off: 1.0, scaled 1.5x: 0.35-0.38; a quantized
    # base corrupted by bitsandbytes' CPU repack (see quantize.keep_trainable_layout): 0.6-1.5.
    assert effect["plain"].abs().mean() > 1e-2
    error = (effect["quantized"] - effect["plain"]).norm() / effect["plain"].norm()
    assert error < {"4bit": 0.3, "8bit": 0.1}[quantization], f"adapter effect differs by {error:.2f} of its size"


def test_quantization_and_optimizer_combinations_that_cannot_run_are_one_line(tiny_model_dir, qa_data_dir,
                                                                             tmp_path, capsys):
    cases = [
        (["--quantization", "4bit"], "add --lora_dim"),
        (["--optim", "paged_adamw_8bit"], "needs CUDA"),
        (["--quantization", "4bit", "--lora_dim", "4", "--engine", "deepspeed"], "single-process and DDP"),
        (["--double_quant", "true"], "--double_quant applies to --quantization 4bit only"),
        (["--optim", "sgd"], "--optim 'sgd' is unknown"),
    ]
    for i, (extra, expected) in enumerate(cases):
        code = main(["train", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir,
                     "--output_dir", str(tmp_path / f"o{i}"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and len(err.splitlines()) == 1, (extra, err)
        assert not (tmp_path / f"o{i}").exists()


@pytest.mark.parametrize("lean", [True, False])
def test_offload_activations_gives_the_same_loss_and_gradients(lean, tokenizer):
    from easysft.engines.base import prepare_replicated_model
    from easysft.kernels.offload import offload_saved_activations

    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(offload: bool):
        model = prepare_replicated_model(make_tiny_model(tokenizer, seed=5), TrainConfig(lean_activations=lean),
                                         defer_head_weight_grad=False)
        hooks = offload_saved_activations(model, pin_memory=False) if offload else None
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, hooks

    loss_a, grads_a, _ = loss_and_grads(False)
    loss_b, grads_b, hooks = loss_and_grads(True)
    assert hooks.packed_tensors > 10  # the saved activations really went through the CPU copies
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_training_with_offload_activations_matches(tiny_model_dir, qa_data_dir, tmp_path):
    plain = _run(tiny_model_dir, qa_data_dir, tmp_path / "a", lora=LoraConfig(), max_steps=2)
    offloaded = _run(tiny_model_dir, qa_data_dir, tmp_path / "b", lora=LoraConfig(), max_steps=2,
                     offload_activations=True)
    assert offloaded.losses == plain.losses


def test_out_of_memory_in_a_step_is_one_line_and_the_last_checkpoint_is_intact(tiny_model_dir, qa_data_dir,
                                                                               tmp_path, capsys, monkeypatch):
    from easysft.engines.single import SingleEngine

    calls = {"n": 0}
    real_backward = SingleEngine.backward

    def backward(self, loss):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3 of batch 2 x accumulation 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_backward(self, loss)

    monkeypatch.setattr(SingleEngine, "backward", backward)
    out = tmp_path / "oom"
    code = main(["train", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir, "--output_dir", str(out),
                 "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2",
                 "--tensorboard", "false"])
    output = capsys.readouterr().err.strip()
    err = output.splitlines()[-1]  # progress and start-up lines go to stderr too; the error is the last line
    assert code == 6 and err.startswith("easysft: error: out of memory") and "Traceback" not in output, output
    assert "out of memory" in err and "at step 3" in err and "measured peak" in err and "--quantization" in err
    assert checkpoint.is_complete(checkpoint.step_dir(out, 2)) and str(checkpoint.step_dir(out, 2)) in err
    checkpoint.verify(checkpoint.step_dir(out, 2))


def test_memory_estimate_is_printed_and_refuses_a_run_that_cannot_fit(tiny_model_dir, qa_data_dir, tmp_path,
                                                                       capsys, monkeypatch):
    import easysft.training.memory_check as memory_check

    monkeypatch.setattr(memory_check, "device_capacity_bytes", lambda device: (10 * 2**20, "available RAM"))
    code = main(["train", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir,
                 "--output_dir", str(tmp_path / "refused"), "--max_steps", "1", "--tensorboard", "false"])
    output = capsys.readouterr().err.strip()
    assert "memory estimate per device (cpu)" in output and "Traceback" not in output
    err = output.splitlines()[-1]
    assert code == 6 and err.startswith("easysft: error: this run needs about")
    assert "--skip_memory_check" in err and "--gradient_checkpointing" in err
    assert not Path(tmp_path / "refused" / "adapter_config.json").exists()
    code = main(["train", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir,
                 "--output_dir", str(tmp_path / "forced"), "--max_steps", "1", "--tensorboard", "false",
                 "--skip_memory_check", "true"])
    assert code == 0


def test_check_functions_name_the_engine():
    from easysft.engines.optimizers import check_optim
    from easysft.models.quantize import check_quantization

    with pytest.raises(ConfigError, match="fsdp"):
        check_quantization("8bit", lora_enabled=True, only_optimize_lora=True, engine="fsdp")
    with pytest.raises(ConfigError, match="only_optimize_lora"):
        check_quantization("4bit", lora_enabled=True, only_optimize_lora=False, engine="single")
    with pytest.raises(ConfigError, match="deepspeed"):
        check_optim("adamw_4bit", engine="deepspeed", device_type="cuda")
    check_optim("paged_adamw_8bit", engine="ddp", device_type="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_with_paged_8bit_adamw_on_cuda(wide_model_dir, qa_data_dir, tmp_path):
    """The CUDA-only combination: 4-bit base quantized onto the GPU, paged 8-bit AdamW, a resume."""
    from easysft.training import signals

    kwargs = dict(quantization="4bit", double_quant=True, optim="paged_adamw_8bit", lora=LoraConfig(lora_dim=32),
                  save_steps=2, dtype="bf16")
    full = _run(wide_model_dir, qa_data_dir, tmp_path / "full", **kwargs)
    assert all(torch.isfinite(torch.tensor(full.losses)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("EASYSFT_STOP_AFTER_STEP", "2")
        with pytest.raises(signals.Preempted):
            _run(wide_model_dir, qa_data_dir, tmp_path / "stopped", **kwargs)
    resumed = _run(wide_model_dir, qa_data_dir, tmp_path / "stopped", resume="latest", **kwargs)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-3)
