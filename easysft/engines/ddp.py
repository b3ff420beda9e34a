"""torchrun + PyTorch DistributedDataParallel: every rank holds the whole model; gradients are all-reduced.

Launch: ``torchrun --nproc_per_node N -m easysft train ... --engine ddp`` (``--engine auto`` picks DDP under a
launcher). gloo on CPU, nccl on CUDA.

Gradient math: DDP AVERAGES gradients over ranks, while the loop's loss is already normalised by the supervised
tokens of the whole step over ALL ranks; ``grad_scale = world_size`` cancels the average so the result equals the
single-process gradient exactly (up to summation order). Non-final micro-batches of a step run under
``no_sync()``: gradients accumulate locally and are all-reduced once, at the last micro-batch.
"""

from __future__ import annotations

import contextlib

import torch

from easysft.distributed import init_process_group
from easysft.engines.base import (
    build_training_state,
    prepare_replicated_model,
    release_cpu_memory,
    save_local_state,
)
from easysft.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    """The single engine around a DDP wrapper. Inherited: backward, clip/step, LR and checkpoint loading, which
    every rank runs on its own replica: after the all-reduce every rank holds identical gradients, so the norm (and
    the skip decision) agree. Different: set-up, gradient scale, no_sync, unwrapping, and who writes files."""

    name = "ddp"
    gathers_state_dict = False  # every rank holds full weights: rank 0 saves its own model

    def __init__(self, dist_info) -> None:
        super().__init__(dist_info)
        init_process_group(dist_info, single_process=True)

    def prepare_model(self, model: torch.nn.Module, train_cfg) -> torch.nn.Module:
        """Lean activations; the LM-head gradient stays in autograd's order (DDP's reducer reads gradients as
        they accumulate), and a tied embedding adds its gradient in place."""
        return prepare_replicated_model(model, train_cfg, defer_head_weight_grad=False)

    def setup(self, model: torch.nn.Module, *, train_cfg, num_training_steps: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        # broadcast_buffers=False: the only buffers are deterministic (rotary tables), identical on every rank;
        # broadcasting them would add a collective to every forward, eval included.
        self.model = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
        self.optimizer, self.scheduler, self.scaler = build_training_state(
            model, train_cfg, num_training_steps, self.device)
        release_cpu_memory(self.unwrapped_model(), train_cfg, self.device)

    @property
    def grad_scale(self) -> float:
        return float(self.dist.world_size)

    def accumulate(self, is_last_micro_batch: bool):
        # DDP decides in forward whether the next backward all-reduces, so covering the forward is enough.
        return contextlib.nullcontext() if is_last_micro_batch else self.model.no_sync()

    def unwrapped_model(self) -> torch.nn.Module:
        model = self.model.module
        return getattr(model, "_orig_mod", model)  # torch.compile wrapper

    def full_state_dict(self):
        """Rank 0: the replicated weights (no gather needed); other ranks: None."""
        return self.unwrapped_model().state_dict() if self.dist.is_main else None

    def save_checkpoint(self, path) -> None:
        """Rank 0 writes the single engine's files (every rank holds the same replica; one writer per file)."""
        if self.dist.is_main:
            save_local_state(path, self.unwrapped_model(), self.optimizer, self.scheduler, self.scaler)
