"""Token-weighted loss.

The model returns the SUM of next-token cross-entropy over supervised positions and how many there were.
The training loop divides by the number of supervised tokens in the whole optimizer step (all micro-batches,
all ranks), so batch 4 x accumulation 1 equals batch 1 x accumulation 4 equals 2 ranks x 2 (rule 3).

Speed: the LM head runs only on supervised positions. transformers' ``logits_to_keep`` accepts a boolean
``(batch, seq)`` mask and projects only the kept hidden states, so full-vocabulary logits are never
materialised for prompt or padding tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from easysft.data.tokenize import IGNORE_INDEX


@dataclass
class LossSum:
    """``loss_sum``: summed NLL (a graph-carrying scalar); ``num_tokens``: supervised targets counted."""

    loss_sum: torch.Tensor
    num_tokens: int


def unwrap_model(model):
    """The innermost model under PEFT (``get_base_model``) and engine wrappers (``.module``)."""
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a causal LM's forward takes (packed batches have no attention_mask)."""
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch and batch[k] is not None}


def supervised_loss_sum(model, batch: dict[str, torch.Tensor], *, supervised_only: bool = True) -> LossSum:
    """Summed next-token NLL over supervised targets of ``batch`` and their count.

    ``supervised_only`` computes logits only where a target is supervised (same value and gradients as the full
    computation, checked by tests); it falls back to full logits for models whose forward lacks
    ``logits_to_keep``.
    """
    labels = batch["labels"]
    targets_full = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_full != IGNORE_INDEX
    num_tokens = int(keep.sum())
    inputs = model_inputs(batch)
    if supervised_only and _accepts_logits_to_keep(model):
        if num_tokens == 0:
            # Keep every rank running the same graph (a rank with no targets still joins collectives).
            logits = model(**inputs, use_cache=False, logits_to_keep=1).logits
            return LossSum(logits.sum() * 0.0, 0)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (num_tokens, vocab)
        targets = labels[:, 1:][keep[:, :-1]]
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum")
        return LossSum(loss_sum, num_tokens)
    logits = model(**inputs, use_cache=False).logits
    loss_sum = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets_full.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return LossSum(loss_sum, num_tokens)
