"""LoRA under 2-process CPU engines saves the same adapter as one process after the same steps (issue 5).

2 ranks x micro-batch 2 see exactly the samples of 1 process x micro-batch 4 (rank r takes slice r of each global
micro-batch), and the loss is normalised by the whole step's supervised tokens, so the adapters must agree to
fp32 noise. ZeRO-3 and FSDP2 shard the weights: the saved adapter is extracted from the gathered full state dict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easysft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from easysft.training.loop import train
from tests.distributed.dist_launch import deepspeed_cmd, launch_env, run, torchrun_cmd

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# lr 1e-3, not 1e-2: Adam divides by sqrt(v), so elements with near-zero gradients turn fp32 reduction-order
# noise (~1e-7 in the grads) into update differences proportional to lr (~1e-4 at 1e-2 under ZeRO-3).
STEPS, LR, RANK = 3, 1e-3, 4
FLAGS = ["--max_steps", str(STEPS), "--learning_rate", str(LR), "--lr_scheduler_type", "constant",
         "--lora_dim", str(RANK), "--lora_module_name", "all-linear", "--tensorboard", "false", "--seed", "5"]


def _launch(kind: str, args: list[str], out: Path, cache_dir: Path) -> None:
    launcher = (torchrun_cmd(2, "-m", "easysft") if kind == "torchrun"
                else deepspeed_cmd(2, "--module", "easysft"))
    finished = run([*launcher, "train", *args, "--output_dir", str(out)], launch_env(cache_dir), timeout_s=420)
    assert finished.returncode == 0, finished.output[-3000:]


@pytest.mark.parametrize(
    ("kind", "engine_flags"),
    [("torchrun", ["--engine", "fsdp"]), ("deepspeed", ["--zero_stage", "2"]), ("deepspeed", ["--zero_stage", "3"])],
    ids=["fsdp2", "zero2", "zero3"],
)
def test_two_rank_lora_adapter_equals_single_process(kind, engine_flags, tiny_model_dir, qa_data_dir, tmp_path):
    single = tmp_path / "single"
    train(ModelConfig(model_name_or_path=tiny_model_dir), DataConfig(data_path=[qa_data_dir]),
          TrainConfig(output_dir=str(single), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=LR,
                      lr_scheduler_type="constant", tensorboard=False, seed=5),
          LoraConfig(lora_dim=RANK, lora_module_name="all-linear"))
    multi = tmp_path / "multi"
    _launch(kind, ["--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir,
                   "--per_device_train_batch_size", "2", *FLAGS, *engine_flags], multi, tmp_path / "cache")

    assert (multi / "adapter_config.json").is_file() and not (multi / "model.safetensors").exists()
    a = load_file(str(single / "adapter_model.safetensors"))
    b = load_file(str(multi / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 14
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=0, msg=name)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
