"""One process, one device (CPU or one GPU): plain PyTorch."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from easysft.train.optim import build_optimizer, build_scheduler


class SingleEngine:
    name = "single"

    def __init__(self, dist_info) -> None:
        self.dist = dist_info
        self.device = dist_info.device
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None

    def setup(self, model: torch.nn.Module, *, train_cfg, num_training_steps: int) -> None:
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(
            self.model, learning_rate=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
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
        return 1.0

    def accumulate(self, is_last_micro_batch: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def grad_norm_and_step(self, max_grad_norm: float, *, skip: bool = False) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        norm = float(norm)
        if not skip and math.isfinite(norm):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def unwrapped_model(self) -> torch.nn.Module:
        model = self.model
        return getattr(model, "_orig_mod", model)  # torch.compile wrapper

    def full_state_dict(self):
        return self.unwrapped_model().state_dict()

    def save_checkpoint(self, path) -> None:
        """Trainable weights (safetensors), optimizer, scheduler and fp16 scaler states into ``path``."""
        from easysft import checkpoint

        path = Path(path)
        checkpoint.save_tensors(checkpoint.trainable_state(self.unwrapped_model()), path)
        checkpoint.save_torch_state(self.optimizer.state_dict(), path / "optimizer.pt")
        checkpoint.save_torch_state(self.scheduler.state_dict(), path / "scheduler.pt")
        if self.scaler is not None:
            checkpoint.save_torch_state(self.scaler.state_dict(), path / "scaler.pt")

    def load_checkpoint(self, path) -> None:
        from easysft import checkpoint
        from easysft.errors import CheckpointError

        path = Path(path)
        checkpoint.load_trainable(self.unwrapped_model(), path)
        for name, target in (("optimizer.pt", self.optimizer), ("scheduler.pt", self.scheduler),
                             ("scaler.pt", self.scaler)):
            if target is None:
                continue
            try:
                target.load_state_dict(checkpoint.load_torch_state(path / name))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"checkpoint file {path / name} does not fit this run: {exc}") from None
