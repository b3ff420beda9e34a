"""AdamW with parameter groups, and learning-rate schedules with warmup (stepped once per optimizer step)."""

from __future__ import annotations

import torch

# Parameters whose names contain these never get weight decay (biases and normalisation weights).
NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed biases/norm weights (and any 1-D parameter)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.ndim < 2 or any(marker in lowered for marker in NO_DECAY_MARKERS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, *, learning_rate: float, weight_decay: float, device_type: str = "cpu",
                    optim: str = "adamw"):
    """AdamW over trainable parameters, fused whenever the parameters are plain tensors; ``optim`` picks a
    low-bit variant instead (engines/optimizers.py).

    Fused matters on CPU too: on 134 M fp32 parameters (2 cores) one fused step takes 0.52 s and peaks at 2.3 GB,
    against 2.56 s and 2.9 GB for the default multi-tensor ("foreach") step, whose temporaries copy every
    parameter. Sharded (DTensor) parameters keep the default implementation.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    kwargs = {"lr": learning_rate, "betas": (0.9, 0.95), "eps": 1e-8}
    if optim != "adamw":
        from easysft.engines.optimizers import make_optimizer

        return make_optimizer(optim, groups, **kwargs)
    if not _has_dtensor(groups) and device_type in ("cpu", "cuda"):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def _has_dtensor(groups: list[dict]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return any(isinstance(p, DTensor) for group in groups for p in group["params"])


def build_scheduler(optimizer, *, name: str, num_warmup_steps: int, num_training_steps: int):
    """transformers' schedule of that name (linear, cosine, cosine_with_restarts, polynomial, constant...)."""
    from transformers import get_scheduler

    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=max(num_training_steps, 1)
    )
