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

from easysft.engines.base import clip_and_step, load_local_state, save_local_state
from easysft.engines.process_group import start_process_group
from easysft.train.optim import build_optimizer, build_scheduler


class DDPEngine:
    name = "ddp"
    gathers_state_dict = False  # every rank holds full weights: rank 0 saves its own model

    def __init__(self, dist_info) -> None:
        self.dist = dist_info
        self.device = dist_info.device
        start_process_group(dist_info)
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None

    def setup(self, model: torch.nn.Module, *, train_cfg, num_training_steps: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        # broadcast_buffers=False: the only buffers are deterministic (rotary tables), identical on every rank;
        # broadcasting them would add a collective to every forward, eval included.
        self.model = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
        self.optimizer = build_optimizer(
            model, learning_rate=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
            device_type=self.device.type,
        )
        self.scheduler = build_scheduler(
            self.optimizer, name=train_cfg.lr_scheduler_type, num_warmup_steps=train_cfg.num_warmup_steps,
            num_training_steps=num_training_steps,
        )
        if train_cfg.dtype == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    @property
    def grad_scale(self) -> float:
        return float(self.dist.world_size)

    def accumulate(self, is_last_micro_batch: bool):
        # DDP decides in forward whether the next backward all-reduces, so covering the forward is enough.
        return contextlib.nullcontext() if is_last_micro_batch else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def grad_norm_and_step(self, max_grad_norm: float, *, skip: bool = False) -> float:
        # After the all-reduce every rank holds identical gradients, so the norm (and the skip decision) agree.
        return clip_and_step(self.model.parameters(), self.optimizer, self.scheduler, max_grad_norm, skip,
                             self.scaler)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

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

    def load_checkpoint(self, path) -> None:
        """Every rank reads the same files, so the replicas stay identical."""
        load_local_state(path, self.unwrapped_model(), self.optimizer, self.scheduler, self.scaler)
