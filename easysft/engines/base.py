"""The engine protocol: the ONLY interface between the training loop and DeepSpeed / FSDP / DDP.

The loop computes ``loss = loss_sum / step_tokens`` for each micro-batch, where ``step_tokens`` counts the
supervised tokens of the whole optimizer step over all micro-batches and all ranks, and hands it to
``engine.backward``. Engines whose reduction AVERAGES gradients over ranks (DDP, FSDP, DeepSpeed) or that divide
by the accumulation count (DeepSpeed) multiply by ``grad_scale`` to cancel that, so the summed gradient equals the
single-process one.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch


class Engine(Protocol):
    name: str
    model: torch.nn.Module  # what the loop calls forward on (possibly wrapped)
    device: torch.device

    def setup(self, model: torch.nn.Module, *, train_cfg, num_training_steps: int) -> None:
        """Wrap ``model``, build the optimizer and LR scheduler, move to the device."""

    @property
    def grad_scale(self) -> float:
        """Factor the per-micro-batch loss is multiplied by before backward (see module docstring)."""

    def accumulate(self, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward (skips gradient sync on non-final micro-batches)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def grad_norm_and_step(self, max_grad_norm: float, *, skip: bool = False) -> float:
        """Clip (0 = off), step optimizer and scheduler, zero grads; return the pre-clip grad norm.
        The norm is computed BEFORE stepping: with ``skip`` or a non-finite norm, grads are dropped and no
        update (optimizer or scheduler) happens, identically on every rank."""

    def current_lr(self) -> float: ...

    def unwrapped_model(self) -> torch.nn.Module:
        """The HF (or PEFT) model underneath any wrapper."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full, unsharded weights on rank 0 (None elsewhere). A collective: EVERY rank must call it."""

    def save_checkpoint(self, path) -> None:
        """Write what resuming needs into the existing folder ``path``: trainable weights as safetensors,
        optimizer, scheduler (and GradScaler) state loadable with ``torch.load(weights_only=True)``. A collective:
        EVERY rank calls it; sharded engines (DeepSpeed, FSDP) write their own per-rank shards,
        replicated ones (DDP) write on rank 0 only (the same file from several ranks would be torn). Must not write
        ``COMPLETE``, RNG or trainer state: easysft/checkpoint.py does, after every rank returned. An engine
        without this pair cannot use --save_steps/--resume (checkpoint.require_support says so)."""

    def load_checkpoint(self, path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, after ``setup``; raise CheckpointError naming a bad file."""


def autocast_context(device: torch.device, dtype: str):
    """bf16/fp16 autocast where it applies; fp32 runs without autocast."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=torch_dtype)
