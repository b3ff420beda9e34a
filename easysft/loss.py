"""Token-weighted loss.

The model returns the SUM of next-token cross-entropy over supervised positions and how many there were.
The training loop divides by the number of supervised tokens in the whole optimizer step (all micro-batches,
all ranks), so batch 4 x accumulation 1 equals batch 1 x accumulation 4 equals 2 ranks x 2 (rule 3).

Speed: the LM head runs only on supervised positions, and never as one (tokens x vocab) fp32 block. For a model
whose LM head is a plain bias-free ``nn.Linear`` applied as the last step of the forward (checked once per model by
a probe), the head is told to hand back its input (:func:`_head_emits_hidden`), the supervised positions' hidden
states are picked here, and easysft/chunked_ce.py computes linear + cross-entropy chunk by chunk. This path needs
nothing from transformers beyond the plain forward (no ``logits_to_keep`` tensor). Other models (a LoRA-wrapped
or sharded head: FSDP2, ZeRO-3) use transformers' ``logits_to_keep`` boolean mask, which projects only the kept
hidden states.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from easysft.chunked_ce import linear_cross_entropy_sum
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
    head = chunkable_head(model) if supervised_only and num_tokens else None
    if head is not None:
        with _head_emits_hidden(head):
            hidden = model(**inputs, use_cache=False).logits  # (batch, seq, hidden): the head handed its input
        targets = labels[:, 1:][keep[:, :-1]]
        loss_sum = linear_cross_entropy_sum(hidden[keep], head.weight, targets,
                                            defer_weight_grad=getattr(head, "_easysft_defer_weight_grad", False))
        return LossSum(loss_sum, num_tokens)
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


def chunkable_head(model) -> torch.nn.Linear | None:
    """The LM head when the chunked loss applies: a plain bias-free ``nn.Linear`` holding its whole weight (not
    LoRA-wrapped, not an FSDP2 DTensor, not a ZeRO-3 partition) whose output IS the model's logits (no
    softcapping or scaling after it: checked once by a probe, cached on the head)."""
    base = unwrap_model(model)
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not torch.nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id"):
        return None
    if type(head.weight) not in (torch.nn.Parameter, torch.Tensor) or head.weight.numel() == 0:
        return None
    verdict = getattr(head, "_easysft_logits_are_head_output", None)
    if verdict is None:
        verdict = head._easysft_logits_are_head_output = _logits_are_head_output(base, head)
    return head if verdict else None


@torch.no_grad()
def _logits_are_head_output(base, head: torch.nn.Linear) -> bool:
    """Probe: the logits of a 3-token input equal ``head(hidden)`` where ``hidden`` is what the head received."""
    probe = torch.tensor([[1, 2, 3]], device=head.weight.device) % head.weight.shape[0]
    was_training = base.training
    base.eval()
    try:
        logits = base(input_ids=probe, use_cache=False).logits
        with _head_emits_hidden(head):
            hidden = base(input_ids=probe, use_cache=False).logits
    except Exception:  # noqa: BLE001 - any model that cannot run the probe keeps the transformers path
        return False
    finally:
        base.train(was_training)
    if hidden.shape[-1] != head.weight.shape[1]:
        return False
    return bool(torch.allclose(head(hidden).float(), logits.float(), atol=1e-4, rtol=1e-4))


def _return_input(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def _head_emits_hidden(head: torch.nn.Linear):
    """Within the block the head returns its input (the hidden states) instead of logits. The stand-in forward
    is one module-level function, so torch.compile's guards see the same object on every step."""
    previous = head.__dict__.get("forward")  # an instance-level patch (lean_ops) to put back, or None
    head.forward = _return_input
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
