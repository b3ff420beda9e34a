"""Where the repeated decoder blocks of a transformers model are (FSDP2 shards them, the CPU memory hooks
attach to them)."""

from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks in forward order: modules whose class the HF model names in ``_no_split_modules`` (also
    found inside PEFT or ``torch.compile`` wrappers). Empty when the model names none."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]
