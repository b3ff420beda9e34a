"""bf16 with every default on (lean activations, packing, the chunked supervised-only loss), LoRA under bf16, and
--bf16_weights (bf16 weights, fp32 master AdamW): each trains the same 2 steps as fp32 within bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

from easysft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from easysft.errors import ConfigError
from easysft.training.loop import train

COMMON = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, seed=5, tensorboard=False)


def _train(model_dir, data_dir, out, lora=None, **kwargs):
    return train(ModelConfig(model_name_or_path=model_dir), DataConfig(data_path=[data_dir]),
                 TrainConfig(output_dir=str(out), **COMMON, **kwargs), lora)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import write_qa_folder

    return write_qa_folder(tmp_path_factory.mktemp("bf16-data"))


@pytest.fixture(scope="module")
def fp32_run(tiny_model_dir, data_dir, tmp_path_factory):
    """The fp32 reference run every bf16 variant is compared with (trained once for the module)."""
    return _train(tiny_model_dir, data_dir, tmp_path_factory.mktemp("fp32"))


def _spy_defaults(monkeypatch):
    """Record that the default fast paths really run: lean ops installed, packed rows, the chunked loss."""
    from easysft import chunked_ce
    from easysft.kernels import lean_ops

    seen = {"lean": 0, "chunked": 0, "packed": 0}
    real_apply, real_ce = lean_ops.apply_lean_ops, chunked_ce._LinearCrossEntropySum.apply

    def apply_spy(model, **options):
        seen["lean"] = real_apply(model, **options)
        return seen["lean"]

    def ce_spy(*args):
        seen["chunked"] += 1
        return real_ce(*args)

    monkeypatch.setattr(lean_ops, "apply_lean_ops", apply_spy)
    monkeypatch.setattr(chunked_ce._LinearCrossEntropySum, "apply", ce_spy)
    return seen


def test_bf16_autocast_with_default_flags_matches_fp32(tiny_model_dir, data_dir, fp32_run, tmp_path, monkeypatch):
    seen = _spy_defaults(monkeypatch)
    fp32 = fp32_run
    bf16 = _train(tiny_model_dir, data_dir, tmp_path / "bf16", dtype="bf16")
    assert seen["lean"] >= 8 and seen["chunked"] >= 2  # lean ops in place, the training micro-batches chunked
    assert TrainConfig().packing is True
    assert len(bf16.losses) == 2 and all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert bf16.final_eval.loss == pytest.approx(fp32.final_eval.loss, rel=2e-2)


def test_bf16_weights_with_fp32_master_copy_matches_fp32(tiny_model_dir, data_dir, fp32_run, tmp_path):
    fp32 = fp32_run
    pure = _train(tiny_model_dir, data_dir, tmp_path / "pure", dtype="bf16", bf16_weights=True)
    assert pure.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert pure.final_eval.loss == pytest.approx(fp32.final_eval.loss, rel=2e-2)


def test_master_weight_adamw_keeps_updates_that_bf16_rounding_would_lose():
    """100 steps of an update far below bf16's resolution at 1.0: a plain bf16 AdamW never moves the weight,
    the master copy accumulates it (and the model weight follows once it is representable)."""
    from easysft.engines.optim import MasterWeightAdamW

    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master_opt = MasterWeightAdamW([{"params": [weight], "weight_decay": 0.0}], lr=1e-4)
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        for p, opt in ((weight, master_opt), (plain, plain_opt)):
            p.grad = torch.ones_like(p)
            opt.step()
            opt.zero_grad()
    assert torch.equal(plain, torch.ones_like(plain))  # 1 - 1e-4 rounds back to 1 in bf16, every step
    assert master_opt.master_params[0].dtype == torch.float32
    torch.testing.assert_close(master_opt.master_params[0], torch.full((4,), 0.99), atol=1e-5, rtol=0)
    assert float(weight.detach()[0]) < 1.0
    state = master_opt.state_dict()
    fresh = MasterWeightAdamW([{"params": [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))],
                                "weight_decay": 0.0}], lr=1e-4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.master_params[0], master_opt.master_params[0])


def test_master_weight_adamw_steps_in_chunks_with_the_same_result(monkeypatch):
    """The chunked step (fp32 gradients for one chunk at a time) gives bit-identical masters and weights to one
    step over everything, and never holds more than a chunk of fp32 gradients."""
    from easysft.engines.optim import MasterWeightAdamW

    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (128, 16), (16,), (48, 48)]
    start = [torch.randn(shape).to(torch.bfloat16) for shape in shapes]

    def make(chunk_elements: int):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = MasterWeightAdamW([{"params": params[::2], "weight_decay": 0.1},
                                 {"params": params[1::2], "weight_decay": 0.0}], lr=1e-2)
        opt.STEP_CHUNK_ELEMENTS = chunk_elements
        return params, opt

    whole_params, whole = make(10**9)
    chunked_params, chunked = make(2500)
    held: dict[str, list[int]] = {"whole": [], "chunked": []}
    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        name = "chunked" if self is chunked else "whole"
        held[name].append(sum(m.grad.numel() for m in self.master_params if m.grad is not None))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    for step in range(3):
        grads = [torch.randn(shape).to(torch.bfloat16) for shape in shapes]
        for params in (whole_params, chunked_params):
            for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
                param.grad = None if (step == 1 and i == 3) else grad.clone()  # an unused parameter in step 1
        whole.step()
        chunked.step()
        assert all(p.grad is None for p in chunked_params) and all(m.grad is None for m in chunked.master_params)
    for a, b in zip(whole.master_params + whole_params, chunked.master_params + chunked_params, strict=True):
        assert torch.equal(a, b)
    assert held["whole"][0] == sum(t.numel() for t in start) and len(held["whole"]) == 3  # all at once
    assert max(held["chunked"]) <= 2500 and len(held["chunked"]) >= 3 * 3  # a chunk at a time, several a step


def test_lora_under_bf16_autocast_matches_fp32(tiny_model_dir, data_dir, tmp_path):
    lora = LoraConfig(lora_dim=4, lora_module_name="all-linear")
    fp32 = _train(tiny_model_dir, data_dir, tmp_path / "fp32", lora=lora)
    bf16 = _train(tiny_model_dir, data_dir, tmp_path / "bf16", lora=lora, dtype="bf16")
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)


def test_bf16_weights_need_bf16():
    with pytest.raises(ConfigError, match="--bf16_weights needs --dtype bf16"):
        TrainConfig(bf16_weights=True, dtype="fp32")
    assert TrainConfig(bf16_weights=True).dtype == "auto"  # resolved to bf16 when the run starts


def test_bf16_weights_set_up_bf16_trainable_parameters_and_the_master_weight_optimizer(tiny_model_dir, data_dir,
                                                                                       tmp_path):
    """After set-up (before any step) --bf16_weights holds the model in bf16 and steps it with
    MasterWeightAdamW, whose fp32 masters are copies of exactly the model's trainable parameters; without the
    flag the same set-up is fp32 weights and plain AdamW."""
    from easysft.config import GenerateConfig
    from easysft.engines.optim import MasterWeightAdamW
    from easysft.training.run import setup

    def set_up(out, **kwargs):
        run = setup(ModelConfig(model_name_or_path=tiny_model_dir), DataConfig(data_path=[data_dir]),
                    TrainConfig(output_dir=str(out), **COMMON, **kwargs), LoraConfig(), GenerateConfig())
        model, optimizer = run.engine.unwrapped_model(), run.engine.optimizer
        return run, [p for p in model.parameters() if p.requires_grad], optimizer

    run, trainable, optimizer = set_up(tmp_path / "pure", dtype="bf16", bf16_weights=True)
    assert run.train_cfg.dtype == "bf16" and trainable
    assert {p.dtype for p in trainable} == {torch.bfloat16}
    assert type(optimizer) is MasterWeightAdamW
    assert len(optimizer.model_params) == len(trainable)
    assert {id(p) for p in optimizer.model_params} == {id(p) for p in trainable}
    assert {m.dtype for m in optimizer.master_params} == {torch.float32}
    for param, master in zip(optimizer.model_params, optimizer.master_params, strict=True):
        assert torch.equal(master, param.float())  # the masters start as the loaded weights
    _, trainable, optimizer = set_up(tmp_path / "fp32")
    assert {p.dtype for p in trainable} == {torch.float32} and type(optimizer) is torch.optim.AdamW
