"""LoRA under 2-process CPU engines saves the same adapter as one process after the same steps (issue 5).

2 ranks x micro-batch 2 see exactly the samples of 1 process x micro-batch 4 (rank r takes slice r of each global
micro-batch), and the loss is normalised by the whole step's supervised tokens, so the adapters must agree to
fp32 noise. ZeRO-3 and FSDP2 shard the weights: the saved adapter is extracted from the gathered full state dict.

Cost: the one 1-process reference and the 3 launched runs join the other distributed tests' runs in one torchrun
and one deepspeed job (tests/distributed/launches.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(1800)]  # shared launches

# lr 1e-3, not 1e-2: Adam divides by sqrt(v), so elements with near-zero gradients turn fp32 reduction-order
# noise (~1e-7 in the grads) into update differences proportional to lr (~1e-4 at 1e-2 under ZeRO-3).
STEPS, LR, RANK = 3, 1e-3, 4
FLAGS = ["--max_steps", str(STEPS), "--learning_rate", str(LR), "--lr_scheduler_type", "constant",
         "--lora_dim", str(RANK), "--lora_module_name", "all-linear", "--tensorboard", "false", "--seed", "5"]
# name -> (launcher, engine flags)
ENGINES = {"fsdp2": ("torchrun", ["--engine", "fsdp"]), "zero2": ("deepspeed", ["--zero_stage", "2"]),
           "zero3": ("deepspeed", ["--zero_stage", "3"])}


def add_runs(plan) -> None:
    """The 1-process reference (micro-batch 4) and each engine's 2-rank run (micro-batch 2)."""
    from conftest import write_qa_folder

    work = plan.folder("lora")
    data_dir = write_qa_folder(work / "data")
    common = ["--model_name_or_path", plan.model_dir, "--data_path", data_dir, *FLAGS]
    plan.add("single", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(work / "single")])
    for name, (launcher, engine_flags) in ENGINES.items():
        plan.add(launcher, [*common, "--per_device_train_batch_size", "2", *engine_flags,
                            "--output_dir", str(work / name)])


@pytest.mark.parametrize("name", list(ENGINES))
def test_two_rank_lora_adapter_equals_single_process(name, launched):
    single, multi = launched.folder("lora") / "single", launched.folder("lora") / name

    assert (multi / "adapter_config.json").is_file() and not (multi / "model.safetensors").exists()
    a = load_file(str(single / "adapter_model.safetensors"))
    b = load_file(str(multi / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 14
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0, msg=key)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
