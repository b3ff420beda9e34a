"""``--optim``: the optimizer class behind each name, and the checks that keep a run from failing late.

| name               | library            | state per trainable parameter | where                         |
|--------------------|--------------------|-------------------------------|-------------------------------|
| ``adamw``          | torch (fused)      | 8 bytes (two fp32 moments)    | everywhere                    |
| ``adamw_8bit``     | bitsandbytes       | ~2 bytes (block-wise 8-bit)   | CPU and CUDA; single, DDP     |
| ``paged_adamw_8bit``| bitsandbytes      | ~2 bytes, paged to CPU        | CUDA only; single, DDP        |
| ``adamw_4bit``     | torchao            | ~1 byte (block-wise 4-bit)    | CPU and CUDA; single, DDP     |

Checkpoints: bitsandbytes keeps plain tensors (uint8 moments, fp32 block maxima) in ``state_dict()``; torchao's
moments are tensor subclasses that torchao registers with ``torch.serialization.add_safe_globals``, so both load
back under ``weights_only=True`` (easysft/checkpoint/tensors.py), and a resume continues bit-identically (tested).

torchao wraps each parameter's update in ``torch.compile``; on CPU the first compile takes minutes (measured
315 s for 5 tensors on this machine), so there its step runs eagerly (``torch.compiler.set_stance``), same
numbers. Both libraries are imported only when their optimizer is chosen (each costs 8-20 s here).
"""

from __future__ import annotations

import torch

from easysft.errors import ConfigError

LOW_BIT = ("adamw_8bit", "paged_adamw_8bit", "adamw_4bit")
# Bytes of optimizer state per trainable parameter (block maxima included), used by the memory estimate.
STATE_BYTES_PER_PARAM = {"adamw": 8.0, "adamw_8bit": 2.0 + 8 / 256, "paged_adamw_8bit": 2.0 + 8 / 256,
                         "adamw_4bit": 1.0 + 8 / 128}


def check_optim(optim: str, *, engine: str, device_type: str) -> None:
    """One-line ConfigError for a combination that cannot run (before any model loads)."""
    if optim == "adamw":
        return
    if engine not in ("single", "ddp"):
        raise ConfigError(f"--optim {optim} runs with the single-process and DDP engines only (this run uses "
                          f"{engine}); use --optim adamw there, or train without FSDP2/DeepSpeed.")
    from easysft.models.quantize import require_package

    require_package("torchao" if optim == "adamw_4bit" else "bitsandbytes", f"--optim {optim}")
    if optim.startswith("paged_") and device_type != "cuda":
        raise ConfigError(f"--optim {optim} pages optimizer state between GPU and CPU memory and needs CUDA; "
                          "on CPU use --optim adamw_8bit.")


def make_optimizer(optim: str, groups: list[dict], *, lr: float, betas: tuple, eps: float):
    """The ``--optim`` optimizer over easysft's parameter groups (``engines/optim.py`` builds them)."""
    if optim == "adamw_8bit" or optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if optim.startswith("paged_") else bnb.optim.AdamW8bit
        return cls(groups, lr=lr, betas=betas, eps=eps)
    if optim == "adamw_4bit":
        return _eager_on_cpu_adamw4bit()(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"make_optimizer: no low-bit optimizer called {optim!r}")


def _eager_on_cpu_adamw4bit():
    """torchao's AdamW4bit whose ``step`` runs without ``torch.compile`` when its parameters live on the CPU
    (a subclass, so LR schedulers and checkpoints see an ordinary ``torch.optim.Optimizer``)."""
    from torchao.optim import AdamW4bit

    class AdamW4bitEagerOnCpu(AdamW4bit):
        @torch.no_grad()
        def step(self, closure=None):
            if any(p.device.type != "cpu" for g in self.param_groups for p in g["params"]):
                return super().step(closure)
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return AdamW4bitEagerOnCpu
