"""Fast, single-process checks of the engine plumbing: engine choice, the DeepSpeed config easysft builds or
passes through, and the launcher's ``--local_rank`` placement. (The multi-process behaviour is in
test_parity.py and test_faults.py.)"""

from __future__ import annotations

import json

import pytest

from easysft.config import TrainConfig
from easysft.distributed import DistInfo
from easysft.engines import ENGINES, choose_engine
from easysft.errors import ConfigError


def test_every_engine_is_registered():
    assert {"single", "ddp", "fsdp", "deepspeed"} <= set(ENGINES)


@pytest.mark.parametrize(
    ("flags", "world_size", "expected"),
    [
        ({}, 1, "single"),  # no launcher: one process, nothing distributed
        ({}, 2, "ddp"),  # under torchrun
        ({"deepspeed": True}, 2, "deepspeed"),
        ({"zero_stage": 3}, 1, "deepspeed"),
        ({"offload": True, "zero_stage": 2}, 2, "deepspeed"),
        ({"engine": "fsdp"}, 2, "fsdp"),
    ],
)
def test_choose_engine(flags, world_size, expected):
    assert choose_engine(TrainConfig(**flags), DistInfo(world_size=world_size)) == expected


def test_single_process_initialises_nothing_distributed():
    import torch.distributed as tdist

    from easysft.engines import make_engine

    engine = make_engine(choose_engine(TrainConfig(), DistInfo()), DistInfo())
    assert engine.name == "single" and not tdist.is_initialized()


def test_built_deepspeed_config():
    from easysft.engines.deepspeed import build_ds_config

    cfg = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3, zero_stage=3, offload=True,
                      dtype="bf16", max_grad_norm=0.5)
    config, notes = build_ds_config(cfg, world_size=4)
    assert notes == []
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (2, 3, 24)
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                           "offload_param": {"device": "cpu"}}
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False

    config, _ = build_ds_config(TrainConfig(zero_stage=2, offload=True), world_size=1)
    assert "offload_param" not in config["zero_optimization"]  # only ZeRO-3 can offload the weights


def test_user_deepspeed_config_is_passed_through_with_batch_and_precision_filled():
    from easysft.engines.deepspeed import build_ds_config

    user = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "overlap_comm": True},
            "gradient_clipping": 0.3, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    cfg = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, dtype="fp32", zero_stage=3)
    config, notes = build_ds_config(cfg, world_size=2, user_config=user)
    # Filled from easysft's flags:
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 2, 16)
    assert config["bf16"]["enabled"] is False
    # Everything else untouched (ZeRO stage, clipping, optimizer), and the user's dict is not modified:
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert config["gradient_clipping"] == 0.3 and config["optimizer"] == user["optimizer"]
    assert user["bf16"] == {"enabled": True}
    # One note per value actually overridden ("auto" and equal values are silent):
    assert len(notes) == 2
    assert any("gradient_accumulation_steps 1 -> 2" in n for n in notes)
    assert any("bf16.enabled True -> False" in n for n in notes)


def test_bad_deepspeed_config_file_is_one_clear_error(tmp_path):
    from easysft.engines.deepspeed import _read_user_config

    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": 8,\n  oops}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ds.json:2: not valid JSON"):
        _read_user_config(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        _read_user_config(str(tmp_path / "missing.json"))
    bad.write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        _read_user_config(str(bad))


def test_deepspeed_launcher_local_rank_before_the_subcommand(monkeypatch):
    """`deepspeed --module easysft train ...` runs `easysft --local_rank=0 train ...`: still the train command."""
    from easysft import cli

    seen = {}

    def fake_parse(command, argv):
        seen["command"], seen["argv"] = command, argv
        return {}

    monkeypatch.setattr(cli, "parse_values", fake_parse)
    monkeypatch.setattr(cli, "_command_module", lambda name: type("M", (), {"run": staticmethod(lambda v: 0)}))
    assert cli.main(["--local_rank=1", "train", "--data_path", "d"]) == 0
    assert seen == {"command": "train", "argv": ["--data_path", "d", "--local_rank=1"]}


@pytest.mark.parametrize("name, device, cuda_bf16, bf16_weights, expected", [
    ("auto", "cuda", True, False, "bf16"),   # Ampere or newer: bf16 autocast, as TRL's default
    ("auto", "cuda", False, False, "fp32"),  # no bf16 on this GPU: fp32, never an fp16 loss scaler by surprise
    ("auto", "cpu", False, False, "fp32"),   # bf16 matmuls are slower than fp32 on CPUs without AMX
    ("auto", "cpu", False, True, "bf16"),    # --bf16_weights asks for bf16
    ("fp32", "cuda", True, False, "fp32"),   # an explicit choice is kept
    ("fp16", "cuda", True, False, "fp16"),
    ("bf16", "cpu", False, False, "bf16"),
])
def test_dtype_auto_resolves_per_machine(name, device, cuda_bf16, bf16_weights, expected):
    from easysft.dtypes import resolve_dtype

    assert resolve_dtype(name, device, cuda_bf16=cuda_bf16, bf16_weights=bf16_weights) == expected


def test_dtype_auto_is_the_default_and_bf16_weights_accepts_it():
    assert TrainConfig().dtype == "auto"
    assert TrainConfig(bf16_weights=True).bf16_weights
    with pytest.raises(ConfigError, match="--bf16_weights needs --dtype bf16"):
        TrainConfig(bf16_weights=True, dtype="fp32")
