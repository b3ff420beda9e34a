"""``train_step(run, batches) -> StepRecord``: one optimizer step over its micro-batches.

Loss math (docs/ARCHITECTURE.md, rule 3): every micro-batch contributes ``loss_sum / step_tokens`` where
``step_tokens`` is the number of supervised tokens in the WHOLE optimizer step (all micro-batches, all ranks), so
the update does not depend on how the step is split into micro-batches or ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from easysft.data.collate import count_supervised, count_tokens
from easysft.distributed import all_reduce_sum
from easysft.engines.base import autocast_context
from easysft.loss import supervised_loss_sum


@dataclass
class StepRecord:
    """One optimizer step: its loss (per supervised token), the LR it used, the pre-clip gradient norm, the
    supervised and total token counts over all ranks, and its wall time (collation to update)."""

    loss: float
    lr: float
    grad_norm: float
    num_tokens: int
    total_tokens: int
    seconds: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def train_step(run, micro_batch_indices: list, step: int) -> StepRecord:
    """Forward/backward every micro-batch of optimizer step ``step`` (1-based), then clip and update.

    A non-finite loss makes the engine skip the update (no optimizer or scheduler step) on every rank alike:
    the loss is all-reduced, so every rank takes the same decision.
    """
    started = time.perf_counter()
    engine, device = run.engine, run.dist.device
    batches = [run.make_batch(indices) for indices in micro_batch_indices]
    # All-reduce the step's supervised-token count BEFORE any backward: it is the loss denominator.
    local = [sum(count_supervised(b) for b in batches), sum(count_tokens(b) for b in batches)]
    step_tokens, total_tokens = (int(x) for x in all_reduce_sum(torch.tensor(local)))
    loss_sum = torch.zeros((), dtype=torch.float64)
    engine.model.train()
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with engine.accumulate(i == len(batches) - 1), autocast_context(device, run.train_cfg.dtype):
            out = supervised_loss_sum(engine.model, batch)
            if step in run.hooks.nan_steps:  # testing hook EASYSFT_INJECT_NAN_AT_STEP
                out.loss_sum = out.loss_sum * float("nan")
            loss = out.loss_sum / max(step_tokens, 1) * engine.grad_scale
        engine.backward(loss)
        loss_sum += out.loss_sum.detach().double().cpu()
    step_loss = float(all_reduce_sum(loss_sum)) / max(step_tokens, 1)
    lr = engine.current_lr()  # the LR this update uses (the scheduler moves on inside the step)
    grad_norm = engine.grad_norm_and_step(run.train_cfg.max_grad_norm, skip=not math.isfinite(step_loss))
    return StepRecord(step_loss, lr, grad_norm, step_tokens, total_tokens, time.perf_counter() - started)
