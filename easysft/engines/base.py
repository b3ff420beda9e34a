"""The engine protocol: the ONLY interface between the training loop and DeepSpeed / FSDP / DDP.

The loop computes ``loss = loss_sum / step_tokens`` for each micro-batch, where ``step_tokens`` counts the
supervised tokens of the whole optimizer step over all micro-batches and all ranks, and hands it to
``engine.backward``. Engines whose reduction AVERAGES gradients over ranks (DDP, FSDP, DeepSpeed) or that divide
by the accumulation count (DeepSpeed) multiply by ``grad_scale`` to cancel that, so the summed gradient equals the
single-process one.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Protocol

import torch

from easysft.dtypes import autocast_dtype


class Engine(Protocol):
    name: str
    model: torch.nn.Module  # what the loop calls forward on (possibly wrapped)
    device: torch.device

    def prepare_model(self, model: torch.nn.Module, train_cfg) -> torch.nn.Module:
        """Engine-specific model patches (lean activations, kernels) before checkpointing/compile and ``setup``;
        returns the model to train. Engines whose sharding hooks the patches would bypass return it unchanged."""

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
        ``COMPLETE``, RNG or trainer state: easysft/checkpoint/protocol.py does, after every rank returned."""

    def load_checkpoint(self, path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, after ``setup``; raise CheckpointError naming a bad file."""


def autocast_context(device: torch.device, dtype: str):
    """bf16/fp16 autocast where it applies; fp32 runs without autocast."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(dtype))


def prepare_replicated_model(model: torch.nn.Module, train_cfg, *, defer_head_weight_grad: bool) -> torch.nn.Module:
    """Model patches for the engines whose every process holds the whole model (single, DDP).

    ``--lean_activations``: the lean RMSNorm/SwiGLU forwards (easysft/kernels/lean_ops.py). The norm-output recipes
    and the deferred LM-head gradient use saved-tensor hooks and autograd-engine callbacks, which stay out of
    ``torch.compile``; ``defer_head_weight_grad`` only where no reducer reads gradients as they accumulate (single).
    """
    if train_cfg.lean_activations:
        from easysft.kernels.lean_ops import apply_lean_ops

        apply_lean_ops(model, recompute_norm_outputs=not train_cfg.torch_compile,
                       defer_head_weight_grad=defer_head_weight_grad and not train_cfg.torch_compile)
    return model


def release_cpu_memory(model: torch.nn.Module, train_cfg, device: torch.device) -> None:
    """``--release_cpu_memory`` on CPU: give memory freed during each step back to the OS (kernels/memory.py).
    FSDP2 and DeepSpeed manage their own gradient buffers and do not call this."""
    if train_cfg.release_cpu_memory and device.type == "cpu":
        from easysft.kernels.memory import release_freed_memory

        release_freed_memory(model)


def build_training_state(model: torch.nn.Module, train_cfg, num_training_steps: int, device: torch.device):
    """(optimizer, LR scheduler, fp16 GradScaler or None) for the PyTorch engines (single, DDP, FSDP2): easysft's
    AdamW parameter groups and the ``--lr_scheduler_type`` schedule; the scaler only for fp16 on CUDA."""
    from easysft.engines.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, learning_rate=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                                device_type=device.type, optim=getattr(train_cfg, "optim", "adamw"),
                                master_weights=getattr(train_cfg, "bf16_weights", False))
    scheduler = build_scheduler(optimizer, name=train_cfg.lr_scheduler_type,
                                num_warmup_steps=train_cfg.num_warmup_steps, num_training_steps=num_training_steps)
    scaler = torch.amp.GradScaler("cuda") if train_cfg.dtype == "fp16" and device.type == "cuda" else None
    return optimizer, scheduler, scaler


def scaled_backward(loss: torch.Tensor, scaler=None) -> None:
    """``loss.backward()``, through the fp16 GradScaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def clip_and_step(params, optimizer, scheduler, max_grad_norm: float, skip: bool, scaler=None) -> float:
    """The shared end of an optimizer step for the PyTorch engines (single, DDP, FSDP2).

    Unscale (fp16 ``scaler``), clip ``params``' gradients to ``max_grad_norm`` (0 = no clipping) and return the
    pre-clip global norm. Only when ``skip`` is False and the norm is finite are the optimizer and the scheduler
    stepped; gradients are zeroed either way. The caller makes the inputs agree across ranks (DDP: all-reduced
    gradients; FSDP2: DTensor shards, whose norm ``clip_grad_norm_`` reduces over ranks), so every rank takes
    the same decision.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
    if not skip and math.isfinite(norm):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def save_local_state(path, model: torch.nn.Module, optimizer, scheduler, scaler=None) -> None:
    """Checkpoint files of an engine whose process holds the whole model and optimizer (single, DDP rank 0):
    trainable weights as safetensors, optimizer / scheduler / fp16 scaler states as weights-only torch files."""
    from easysft.checkpoint import tensors as checkpoint

    path = Path(path)
    checkpoint.save_tensors(checkpoint.trainable_state(model), path)
    checkpoint.save_torch_state(optimizer.state_dict(), path / "optimizer.pt")
    checkpoint.save_torch_state(scheduler.state_dict(), path / "scheduler.pt")
    if scaler is not None:
        checkpoint.save_torch_state(scaler.state_dict(), path / "scaler.pt")


def load_local_state(path, model: torch.nn.Module, optimizer, scheduler, scaler=None) -> None:
    """Restore what :func:`save_local_state` wrote; a file that does not fit is a CheckpointError naming it."""
    from easysft.checkpoint import tensors as checkpoint
    from easysft.errors import CheckpointError

    path = Path(path)
    checkpoint.load_trainable(model, path)
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler), ("scaler.pt", scaler)):
        if target is None:
            continue
        try:
            target.load_state_dict(checkpoint.load_torch_state(path / name))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint file {path / name} does not fit this run: {exc}") from None
