"""The one table of easysft's ``--dtype`` choices and what each means to torch, transformers and vLLM.

Bottom layer: imports nothing from easysft, and torch only inside the functions (the CLI imports the names
without paying for torch).
"""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16")
# The names transformers' ``config.dtype`` and vLLM use for each choice.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """``"bf16"`` -> ``torch.bfloat16`` (and so on for every name in :data:`DTYPES`)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def autocast_dtype(name: str):
    """The dtype autocast runs in for ``--dtype name``; None for fp32 (no autocast)."""
    return None if name == "fp32" else torch_dtype(name)
