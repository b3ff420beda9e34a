"""The one table of easysft's ``--dtype`` choices and what each means to torch, transformers and vLLM.

Bottom layer: imports nothing from easysft, and torch only inside the functions (the CLI imports the names
without paying for torch).
"""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16")
# Every command that runs a model also takes ``auto`` (their default), resolved per machine by
# :func:`resolve_dtype`; ``easysft export`` writes files, so its dtype is always explicit.
DTYPE_CHOICES = ("auto", *DTYPES)
# The names transformers' ``config.dtype`` and vLLM use for each choice.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """``"bf16"`` -> ``torch.bfloat16`` (and so on for every name in :data:`DTYPES`)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def autocast_dtype(name: str):
    """The dtype autocast runs in for ``--dtype name``; None for fp32 (no autocast)."""
    return None if name == "fp32" else torch_dtype(name)


def resolve_dtype(name: str, device_type: str, *, cuda_bf16: bool, bf16_weights: bool = False) -> str:
    """The ``--dtype`` a command uses: ``name`` itself unless it is ``auto``.

    ``auto`` is bf16 on a CUDA device that computes in bf16 (``cuda_bf16``: Ampere or newer) -- autocast for
    training, as TRL's ``bf16=True`` default, and bf16 weights for eval/infer/chat -- and fp32 everywhere else: on
    CPUs without AMX bf16 matmuls are slower than fp32, and fp16 needs a loss scaler that can skip steps.
    ``--bf16_weights`` (training) asks for bf16 weights, so ``auto`` is bf16 there.
    """
    if name != "auto":
        return name
    if bf16_weights or (device_type == "cuda" and cuda_bf16):
        return "bf16"
    return "fp32"


def dtype_for_device(name: str, device, *, bf16_weights: bool = False) -> str:
    """:func:`resolve_dtype` for a torch ``device`` (or its name), asking torch whether that GPU has bf16."""
    import torch

    device = torch.device(device)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return resolve_dtype(name, device.type, cuda_bf16=cuda_bf16, bf16_weights=bf16_weights)
