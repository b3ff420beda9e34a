"""One process, one device (CPU or one GPU): plain PyTorch."""

from __future__ import annotations

import contextlib

import torch

from easysft.engines.base import (
    build_training_state,
    clip_and_step,
    load_local_state,
    prepare_replicated_model,
    release_cpu_memory,
    save_local_state,
    scaled_backward,
)


class SingleEngine:
    name = "single"

    def __init__(self, dist_info) -> None:
        self.dist = dist_info
        self.device = dist_info.device
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None

    def prepare_model(self, model: torch.nn.Module, train_cfg) -> torch.nn.Module:
        """Lean activations, with the LM head's weight gradient added after the backward pass."""
        return prepare_replicated_model(model, train_cfg, defer_head_weight_grad=True)

    def setup(self, model: torch.nn.Module, *, train_cfg, num_training_steps: int) -> None:
        self.model = model.to(self.device)
        self.optimizer, self.scheduler, self.scaler = build_training_state(
            self.model, train_cfg, num_training_steps, self.device)
        release_cpu_memory(self.unwrapped_model(), train_cfg, self.device)

    @property
    def grad_scale(self) -> float:
        return 1.0

    def accumulate(self, is_last_micro_batch: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        scaled_backward(loss, self.scaler)

    def grad_norm_and_step(self, max_grad_norm: float, *, skip: bool = False) -> float:
        return clip_and_step(self.model.parameters(), self.optimizer, self.scheduler, max_grad_norm, skip,
                             self.scaler)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def unwrapped_model(self) -> torch.nn.Module:
        model = self.model
        return getattr(model, "_orig_mod", model)  # torch.compile wrapper

    def full_state_dict(self):
        return self.unwrapped_model().state_dict()

    def save_checkpoint(self, path) -> None:
        """Trainable weights (safetensors), optimizer, scheduler and fp16 scaler states into ``path``."""
        save_local_state(path, self.unwrapped_model(), self.optimizer, self.scheduler, self.scaler)

    def load_checkpoint(self, path) -> None:
        load_local_state(path, self.unwrapped_model(), self.optimizer, self.scheduler, self.scaler)
