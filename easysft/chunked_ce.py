"""Linear + cross-entropy over supervised positions that never holds (tokens x vocab) fp32 logits at once.

``linear_cross_entropy_sum(hidden, weight, targets)`` returns ``sum_i CE(hidden_i @ weight.T, targets_i)`` (one
scalar), the same value and gradients as ``F.cross_entropy(F.linear(hidden, weight).float(), targets,
reduction="sum")`` within float rounding (tests check both, fp32 and bf16 autocast).

How: the forward pass walks the tokens in chunks of ``chunk_tokens``, computing each chunk's logits, their fp32
log-sum-exp and the target's logit, and keeps only the log-sum-exp per token (4 bytes a token). The backward pass
recomputes each chunk's logits, turns them into ``softmax - one_hot`` and multiplies them into the gradients of
the hidden states and of the weight. The price is one extra (tokens x hidden x vocab) product -- a few percent of
a step for a small vocabulary head, ~1% for a 1.7 B model -- in exchange for memory that no longer grows with
tokens x vocab. When everything fits in ONE chunk (the CPU default and small batches) the forward pass keeps that
chunk's ``softmax - one_hot`` instead, so nothing is recomputed: as fast as the plain path, with one (tokens x
vocab) buffer instead of the logits plus their log-softmax.

Precision follows autocast: the products run in the autocast dtype (bf16 on GPU) exactly as ``F.linear`` would
under autocast, the softmax and the loss in fp32, gradients come back in the inputs' own dtypes.

``defer_weight_grad`` (single process only; easysft/kernels/lean_ops.py explains why): when the saved
``softmax - one_hot`` is no larger than the weight, the weight's gradient is added into ``weight.grad`` after the
backward pass has finished (an autograd-engine callback), when the activations are gone. The weight is still an
input of the autograd Function, so a tied embedding's gradient hooks (DDP) see it accumulate as usual.

Bottom layer: imports torch only.
"""

from __future__ import annotations

import torch

# Bytes of fp32 chunk logits allowed at once: CUDA keeps a chunk small against the activations; the CPU default
# is large enough that the usual micro-batch is one chunk (no recompute: as fast as the plain path).
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 1024 * 2**20}


def default_chunk_tokens(vocab_size: int, device_type: str) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about ``CHUNK_BYTES[device_type]``."""
    return max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"]) // (4 * vocab_size))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would multiply in here: autocast's when it is on for this device, else the input's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _chunk_grad_logits(hidden_c, weight_c, targets_c, lse_c) -> torch.Tensor:
    """``softmax - one_hot`` of one chunk, in fp32 (``lse_c``: that chunk's fp32 log-sum-exp)."""
    logits = (hidden_c @ weight_c.T).float()
    probs = torch.exp_(logits.sub_(lse_c[:, None]))
    probs[torch.arange(targets_c.shape[0], device=probs.device), targets_c] -= 1.0
    return probs


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                defer_weight_grad: bool, needs_grad: bool) -> torch.Tensor:
        compute_dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
            n = hidden.shape[0]
            one_chunk = n <= chunk_tokens
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            saved_grad_logits = None
            for start in range(0, n, chunk_tokens):
                end = min(start + chunk_tokens, n)
                logits = (hidden_c[start:end] @ weight_c.T).float()
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, targets[start:end, None]).squeeze(1)
                loss += (lse[start:end] - picked).sum()
                if one_chunk and needs_grad:
                    # One chunk: keep softmax - one_hot now instead of recomputing the logits in backward.
                    probs = torch.exp_(logits.sub_(lse[start:end, None]))
                    probs[torch.arange(end - start, device=probs.device), targets[start:end]] -= 1.0
                    saved_grad_logits = probs
                del logits
        ctx.save_for_backward(hidden, targets, lse, saved_grad_logits)
        ctx.weight, ctx.compute_dtype = weight, compute_dtype  # the parameter object itself (see lean_ops)
        ctx.chunk_tokens, ctx.defer_weight_grad = chunk_tokens, defer_weight_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, targets, lse, saved_grad_logits = ctx.saved_tensors
        weight, compute_dtype, chunk = ctx.weight, ctx.compute_dtype, ctx.chunk_tokens
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        scale = grad_loss.float()
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        n = hidden.shape[0]
        defer = want_weight and ctx.defer_weight_grad and n * weight.shape[0] <= weight.numel()
        grad_weight, deferred = None, []
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            if saved_grad_logits is not None:
                grad_logits = saved_grad_logits
            else:
                grad_logits = _chunk_grad_logits(hidden_c[start:end], weight_c, targets[start:end], lse[start:end])
            grad_logits = (grad_logits * scale).to(compute_dtype)
            if want_hidden:
                grad_hidden[start:end] = (grad_logits @ weight_c).to(hidden.dtype)
            if defer:
                deferred.append((grad_logits, hidden_c[start:end]))
            elif want_weight:
                part = (grad_logits.T @ hidden_c[start:end]).to(weight.dtype)
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
            del grad_logits
        if defer:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: _add_weight_grad(weight, deferred))
        return grad_hidden, grad_weight, None, None, None, None


def _add_weight_grad(weight: torch.Tensor, parts: list) -> None:
    """Add ``sum grad_logits^T @ hidden`` into ``weight.grad`` in place (after the backward pass)."""
    for grad_logits, hidden in parts:
        if weight.grad is None:
            weight.grad = (grad_logits.T @ hidden).to(weight.dtype)
        else:
            weight.grad.addmm_(grad_logits.T.to(weight.grad.dtype), hidden.to(weight.grad.dtype))
    parts.clear()


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             chunk_tokens: int | None = None, defer_weight_grad: bool = False) -> torch.Tensor:
    """Summed CE of ``hidden (n, h) @ weight (V, h).T`` against ``targets (n,)`` (all supervised: no -100).

    ``chunk_tokens`` defaults to :func:`default_chunk_tokens` for the device. See the module docstring for the
    memory/recompute trade and ``defer_weight_grad``.
    """
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.device.type)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, int(chunk_tokens), bool(defer_weight_grad),
                                        needs_grad)
