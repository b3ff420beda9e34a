"""2 CPU processes train exactly like 1 (docs/ARCHITECTURE.md rule 3): DDP, FSDP2 and DeepSpeed ZeRO 0/1/2/3.

Same global batch and sample order: one process with micro-batch 4 against 2 ranks with micro-batch 2 (the
batching rule gives rank r the r-th half of each global micro-batch). fp32, dropout 0, 10 optimizer steps.
Every per-step loss must agree within 1e-4, and so must the saved model (loaded with plain transformers), the
final eval loss (which reduces (NLL sum, token count) over ranks) and, within 0.1%, every gradient norm.

The training rows are crafted so that, in every micro-batch of the first epoch, rank 0 gets two LONG answers and
rank 1 two SHORT ones: per-rank token counts differ several-fold, so any per-rank (instead of global) loss
normalisation would show. A second configuration uses gradient accumulation 2.

Cost: these runs join the other distributed tests' runs in one torchrun and one deepspeed job
(tests/distributed/launches.py); the 1-process references train in the test process.
"""

from __future__ import annotations

import json

import pytest
from dist_launch import load_weights, max_weight_diff, read_final_eval, read_grad_norms, read_losses

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1800)]  # the shared launches (launches.py)

SEED = 4321
NUM_ROWS = 40  # 10 global micro-batches of 4: 10 steps are exactly one epoch at accumulation 1
STEPS = 10
TOL = 1e-4
LONG_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()

# name -> (launcher, engine flags); "single" is the 1-process reference.
ENGINES = {
    "ddp": ("torchrun", ["--engine", "ddp"]),
    "fsdp": ("torchrun", ["--engine", "fsdp"]),
    "zero0": ("deepspeed", ["--deepspeed", "--zero_stage", "0"]),
    "zero1": ("deepspeed", ["--deepspeed", "--zero_stage", "1"]),
    "zero2": ("deepspeed", ["--deepspeed", "--zero_stage", "2"]),
    "zero3": ("deepspeed", ["--deepspeed", "--zero_stage", "3"]),
}
# Which engines also run with gradient accumulation 2 (DeepSpeed's own 1/gas scaling is the risky part).
GAS2_ENGINES = ("ddp", "fsdp", "zero2", "zero3")


def uneven_rows() -> list[dict]:
    """Rows placed so the seed's epoch-0 permutation hands rank 0 long answers and rank 1 short ones."""
    from easysft.data.batching import epoch_order

    order = epoch_order(NUM_ROWS, SEED, 0)
    rows: list[dict] = [{}] * NUM_ROWS
    for position, index in enumerate(order):
        if position % 4 < 2:  # first half of a global micro-batch of 4 -> rank 0 (micro-batch 2)
            answer = " ".join(LONG_WORDS[(index + k) % len(LONG_WORDS)] for k in range(24))
        else:
            answer = f"w{index}"
        rows[index] = {"prompt": f"Item {index}: continue the list.", "answer": answer}
    return rows


def train_args(data_dir: str, model_dir: str, output_dir: str, micro_batch: int, gas: int) -> list[str]:
    return ["--data_path", data_dir, "--model_name_or_path", model_dir, "--output_dir", output_dir,
            "--overwrite_output_dir", "--per_device_train_batch_size", str(micro_batch),
            "--gradient_accumulation_steps", str(gas), "--max_steps", str(STEPS), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "cosine", "--num_warmup_steps", "2", "--weight_decay", "0.01",
            "--max_grad_norm", "1.0", "--seed", str(SEED), "--dtype", "fp32", "--tensorboard", "false",
            "--per_device_eval_batch_size", "2"]


def run_name(name: str, gas: int) -> str:
    return f"{name}-gas{gas}"


def configurations() -> list[tuple[str, int]]:
    """(name, gas) of every run; "single" is the 1-process reference."""
    return [(name, gas) for name in ("single", *ENGINES)
            for gas in ((1, 2) if name in GAS2_ENGINES or name == "single" else (1,))]


def add_runs(plan) -> None:
    """Every configuration, for the shared launches (tests/distributed/launches.py)."""
    from conftest import write_qa_folder

    work = plan.folder("parity")
    data_dir = write_qa_folder(work / "data", uneven_rows())
    for name, gas in configurations():
        launcher, flags = ENGINES.get(name, ("single", ["--engine", "single"]))
        micro_batch = 4 if name == "single" else 2
        plan.add(launcher, train_args(data_dir, plan.model_dir, str(work / run_name(name, gas)), micro_batch, gas)
                 + flags)


@pytest.fixture(scope="module")
def parity(launched):
    """{(name, gas): output_dir} of the runs trained by the shared launches."""
    work = launched.folder("parity")
    return {(name, gas): str(work / run_name(name, gas)) for name, gas in configurations()}


def test_rows_give_ranks_very_different_token_counts(tmp_path, tokenizer):
    """The crafted data really is uneven through the real pipeline (prepare_data + the batching rule)."""
    from conftest import write_qa_folder

    from easysft.config import DataConfig
    from easysft.data.batching import materialise, plan_epoch
    from easysft.data.collate import collate, count_supervised
    from easysft.data.dataset import prepare_data

    data = prepare_data(DataConfig(data_path=[write_qa_folder(tmp_path / "d", uneven_rows())]), tokenizer,
                        seed=SEED)
    assert len(data.train) == NUM_ROWS
    plans = [plan_epoch(NUM_ROWS, micro_batch_size=2, seed=SEED, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    for batch0, batch1 in zip(plans[0].batches, plans[1].batches, strict=True):
        tokens0 = count_supervised(collate(materialise(batch0, data.train), tokenizer.pad_token_id))
        tokens1 = count_supervised(collate(materialise(batch1, data.train), tokenizer.pad_token_id))
        assert tokens0 >= 5 * tokens1 > 0, (tokens0, tokens1)


@pytest.mark.parametrize(("name", "gas"), [(name, 1) for name in ENGINES] + [(name, 2) for name in GAS2_ENGINES])
def test_two_ranks_match_one_process(parity, name, gas):
    single, multi = parity[("single", gas)], parity[(name, gas)]
    single_losses, multi_losses = read_losses(single), read_losses(multi)
    assert len(single_losses) == len(multi_losses) == STEPS
    worst = max(abs(a - b) for a, b in zip(single_losses, multi_losses, strict=True))
    assert worst < TOL, f"{name} gas {gas}: per-step losses differ by {worst:.2e}\n{single_losses}\n{multi_losses}"
    # AdamW hardly sees a constant factor on the gradient; the gradient norm does (e.g. a forgotten
    # world_size or accumulation factor in grad_scale would show here as x2 or x0.5).
    for a, b in zip(read_grad_norms(single), read_grad_norms(multi), strict=True):
        assert abs(a - b) <= 1e-3 * abs(a), f"{name} gas {gas}: grad norm {b} != single-process {a}"
    assert abs(read_final_eval(single) - read_final_eval(multi)) < TOL
    diff = max_weight_diff(load_weights(single), load_weights(multi))
    assert diff < TOL, f"{name} gas {gas}: saved weights differ by {diff:.2e}"
    config = json.loads(open(f"{multi}/train_config.json", encoding="utf-8").read())
    assert config["world_size"] == 2
    assert config["engine"] == ("deepspeed" if name.startswith("zero") else name)
