"""Resume with 2 CPU processes (issue 8): a run stopped after step k and resumed with ``--resume`` matches the
uninterrupted run within 1e-4 (per-step losses and final weights), for DDP, FSDP2 (DCP checkpoints) and
DeepSpeed ZeRO-2 / ZeRO-3 (DeepSpeed's own checkpoints), and LoRA under FSDP2 (adapter-only DCP state).

The stop uses the testing hook ``EASYSFT_STOP_AFTER_STEP`` (a smaller --max_steps would change the LR schedule):
it writes a complete checkpoint and exits 75. 8 rows, micro-batch 2 on 2 ranks -> 2 steps per epoch; stopping
after step 3 resumes MID-epoch (epoch 1, micro-batch 1), and the run then crosses an epoch boundary. LR warmup +
cosine, weight decay and clipping are on, so the optimizer AND scheduler states must come back.

Cost: the 3 command lines per engine (full, stopped, resumed) join the other distributed tests' runs in one
torchrun job (DDP, FSDP2) and one deepspeed job (ZeRO-2, ZeRO-3): tests/distributed/launches.py.
"""

from __future__ import annotations

import pytest
from dist_launch import load_weights, max_weight_diff, read_losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(1800)]  # shared launches

STEPS = 6
STOP_AFTER = 3
TOL = 1e-4
ENGINES = {
    "ddp": ("torchrun", ["--engine", "ddp"]),
    "fsdp": ("torchrun", ["--engine", "fsdp"]),
    # LoRA under FSDP2: only the adapter (and its optimizer state) is in the DCP checkpoint, frozen weights not.
    "fsdp-lora": ("torchrun", ["--engine", "fsdp", "--lora_dim", "4", "--lora_module_name", "all-linear"]),
    "zero2": ("deepspeed", ["--deepspeed", "--zero_stage", "2"]),
    "zero3": ("deepspeed", ["--deepspeed", "--zero_stage", "3"]),
}


def train_args(data_dir: str, model_dir: str, output_dir: str) -> list[str]:
    return ["--data_path", data_dir, "--model_name_or_path", model_dir, "--output_dir", output_dir,
            "--per_device_train_batch_size", "2", "--max_steps", str(STEPS), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "cosine", "--num_warmup_steps", "2", "--weight_decay", "0.01",
            "--max_grad_norm", "1.0", "--seed", "77", "--dtype", "fp32", "--tensorboard", "false",
            "--save_steps", "2", "--per_device_eval_batch_size", "2"]


def add_runs(plan) -> None:
    """Per engine: uninterrupted, stopped after step 3, resumed -- for the shared launches (launches.py)."""
    from conftest import write_qa_folder

    work = plan.folder("resume")
    qa_data_dir = write_qa_folder(work / "data")  # the 8-row QA set
    for name, (launcher, flags) in ENGINES.items():
        full, resumed = str(work / f"{name}-full"), str(work / f"{name}-resumed")
        plan.add(launcher, train_args(qa_data_dir, plan.model_dir, full) + flags)
        plan.add(launcher, train_args(qa_data_dir, plan.model_dir, resumed) + flags,
                 env={"EASYSFT_STOP_AFTER_STEP": str(STOP_AFTER)}, expect=75)
        plan.add(launcher, train_args(qa_data_dir, plan.model_dir, resumed) + flags + ["--resume"])


@pytest.fixture(scope="module")
def runs(launched):
    """{engine: (uninterrupted output_dir, stopped-and-resumed output_dir)}."""
    work = launched.folder("resume")
    return {name: (str(work / f"{name}-full"), str(work / f"{name}-resumed")) for name in ENGINES}


def saved_weights(output_dir: str) -> dict:
    """The final model's weights, or the adapter's for a LoRA run (saved as an adapter folder)."""
    from pathlib import Path

    from safetensors.torch import load_file

    adapter = Path(output_dir) / "adapter_model.safetensors"
    return load_file(str(adapter)) if adapter.is_file() else load_weights(output_dir)


@pytest.mark.parametrize("name", list(ENGINES))
def test_stopped_and_resumed_run_matches_the_uninterrupted_one(runs, name):
    from pathlib import Path

    full, resumed = runs[name]
    full_losses, resumed_losses = read_losses(full), read_losses(resumed)
    assert len(full_losses) == len(resumed_losses) == STEPS, (full_losses, resumed_losses)
    worst = max(abs(a - b) for a, b in zip(full_losses, resumed_losses, strict=True))
    assert worst < TOL, f"{name}: per-step losses differ by {worst:.2e}\n{full_losses}\n{resumed_losses}"
    diff = max_weight_diff(saved_weights(full), saved_weights(resumed))
    assert diff < TOL, f"{name}: final weights differ by {diff:.2e}"
    # The resume really came from the stop's checkpoint, and it was complete.
    assert (Path(resumed) / "checkpoints" / f"step-{STOP_AFTER}" / "COMPLETE").is_file()
