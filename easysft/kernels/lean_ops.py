"""Memory-lean forward/backward for the RMSNorm and SwiGLU MLP of Llama-style decoders (fp32-exact forward).

Why: autograd keeps every intermediate its backward formulas mention. For a Llama block that is, per token, the
normalised hidden state of both RMSNorms (2 x hidden) and, in the MLP, ``silu(gate)`` and ``silu(gate) * up``
(2 x intermediate) -- about 40% of the activation memory of SmolLM2, while all of them are cheap elementwise
functions of tensors that are kept anyway. The two autograd functions here keep only their inputs and recompute
the rest in the backward pass (the same trade Liger-Kernel makes on GPU, in plain PyTorch so it runs anywhere).

Contract of :func:`apply_lean_ops`: it swaps the ``forward`` of every matching module *instance* of ``model``
(class attributes and other models are untouched) and returns how many modules it changed. Outputs are bitwise
identical to transformers' forward (same operations in the same order); gradients agree to float rounding
(tested within 1e-5). Matching is structural, not by class name:

- an RMSNorm: a module with a 1-D ``weight`` and ``variance_epsilon`` whose class name ends in ``RMSNorm``, and
  whose forward is the Llama formula (checked on a probe input before swapping);
- a SwiGLU MLP: ``gate_proj``, ``up_proj``, ``down_proj`` plain bias-free ``nn.Linear`` (not LoRA-wrapped) and
  an ``act_fn`` that computes SiLU (checked on a probe).

The normalised output of an RMSNorm is also what the next projections (q/k/v, gate/up) save as their input:
another 2 x hidden per token and block. :func:`apply_lean_ops` therefore also installs, around the model's
forward, ``saved_tensors_hooks`` that store such a tensor as a recipe (the norm's input, which the norm keeps
anyway, and its weight) and recompute it bitwise in the backward pass (:class:`_NormOutputRecipes`). Inside
activation-checkpointed blocks the checkpoint's own hooks take precedence, so nothing changes there.

The LM head's weight gradient (vocabulary x hidden: 113 MB for SmolLM2 in fp32) is the first gradient of the
backward pass, so it is held while every activation is still alive. In a single process
(``defer_head_weight_grad``), :class:`_HeadWeightGradAfterBackward` keeps the head's small inputs and output
gradient instead (supervised positions only) and adds their product into ``weight.grad`` in place once the
backward pass has finished (an autograd engine callback), when the activations are gone. DDP must not use it:
its reducer reads each gradient as autograd accumulates it.

A tied input embedding (SmolLM2: the LM head's weight) also gets its gradient twice: the LM head's matrix
product, then the embedding's backward, which builds a second dense vocabulary x hidden tensor only to add it to
the first. Without the deferred head gradient (DDP), :class:`_EmbeddingGradInPlace` instead keeps the
embedding's (token ids, output gradient) and adds them into the weight's ``.grad`` in place (``index_add_``)
from a hook that runs right after autograd has accumulated the LM head's part -- before any optimizer or DDP
reduction reads it. Only for tied weights: an untied embedding would get no accumulation, hence no hook.

Use it only where modules are called normally (single process, DDP): DeepSpeed ZeRO-3 gathers a weight in
its module's forward hook, which the fused MLP tail bypasses for ``down_proj``. Saved-tensor hooks do not go
through ``torch.compile``: pass ``recompute_norm_outputs=False`` there.
"""

from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` in fp32, cast back to x's dtype; saves x, weight, rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(torch.float32)
        normed = x32 * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad_out * weight).to(torch.float32)
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
            grad_x = (rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SwiGLUDownFunction(torch.autograd.Function):
    """``(silu(gate) * up) @ down_weight.T``; saves gate, up and the weight, recomputes the product."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, down_weight)
        return F.linear(F.silu(gate) * up, down_weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up, down_weight = ctx.saved_tensors
        # Under autocast the forward multiplied in gate's dtype (bf16) by a cast of the fp32 weight, and the
        # backward runs outside autocast: multiply in gate's dtype again, return the weight's gradient in its own.
        compute_dtype = gate.dtype
        grad_out = grad_out.to(compute_dtype)
        silu_gate = F.silu(gate)
        grad_weight = None
        if ctx.needs_input_grad[2]:
            hidden = silu_gate * up
            grad_weight = (grad_out.reshape(-1, grad_out.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1])
                           ).to(down_weight.dtype)
            del hidden
        grad_hidden = grad_out @ down_weight.to(compute_dtype)
        grad_up = grad_hidden * silu_gate
        sigmoid_gate = torch.sigmoid(gate)
        # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = grad_hidden * up * sigmoid_gate * (1 + gate * (1 - sigmoid_gate))
        return grad_gate, grad_up, grad_weight


def _rmsnorm_output(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The forward formula of :class:`_RMSNormFunction`, without autograd (the backward-time recompute)."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype)


class _NormOutputRecipes(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that store a lean RMSNorm's output as ``(input, weight, eps)`` plus the view's geometry.

    The lean norm calls :meth:`register` with its output; a saved tensor whose storage is that output's (the
    projections save views of it) is packed as the recipe and rebuilt in the backward pass with
    :func:`_rmsnorm_output` -- the same operations in the same order, so the same bits. An entry lives exactly
    as long as the output tensor object (a weakref finalizer removes it), so a reused address is never
    mistaken for it. Not reentrant: one forward at a time.
    """

    def __init__(self) -> None:
        self.outputs: dict[int, tuple] = {}
        self.fallback = None  # (pack, unpack) for the tensors that are not norm outputs; set by kernels/offload.py
        super().__init__(self._pack, self._unpack)

    def register(self, output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        key = output.untyped_storage().data_ptr()
        self.outputs[key] = (x, weight, eps, output.dtype)
        weakref.finalize(output, self.outputs.pop, key, None)

    def _pack(self, tensor: torch.Tensor):
        recipe = self.outputs.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if recipe is None or recipe[3] != tensor.dtype:
            # Any other saved tensor: kept as is, or handed to the outer hooks (--offload_activations), which
            # these hooks would otherwise shadow.
            return tensor if self.fallback is None else ("other", self.fallback[0](tensor))
        return recipe[:3], (tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed[0] == "other":
            return self.fallback[1](packed[1])
        (x, weight, eps), (size, stride, offset) = packed
        return _rmsnorm_output(x, weight, eps).as_strided(size, stride, offset)


def _lean_rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    output = _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    recipes = getattr(self, "_easysft_recipes", None)
    if recipes is not None and torch.is_grad_enabled():
        recipes.register(output, hidden_states, self.weight, self.variance_epsilon)
    return output


class _EmbeddingGradInPlace(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward hands ``(ids, grad_out)`` to ``pending`` instead of returning
    a dense weight gradient; :func:`_add_pending_embedding_grads` adds them into ``weight.grad``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None, pending: list):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.pending = padding_idx, pending
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        ids, grad_out = ids.reshape(-1), grad_out.reshape(ids.numel(), -1)
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            keep = ids != ctx.padding_idx
            ids, grad_out = ids[keep], grad_out[keep]
        ctx.pending.append((ids, grad_out))
        return None, None, None, None


def _add_pending_embedding_grads(weight: torch.Tensor, pending: list) -> None:
    """The embedding's part of a tied weight's gradient, added in place after autograd accumulated the rest."""
    while pending:
        ids, grad_out = pending.pop(0)
        weight.grad.index_add_(0, ids, grad_out.to(weight.grad.dtype))


def _lean_embedding_forward(self, ids: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return F.embedding(ids, self.weight, self.padding_idx)
    return _EmbeddingGradInPlace.apply(self.weight, ids, self.padding_idx, self._easysft_pending_grads)


def _plain_trainable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head when it is a plain bias-free ``nn.Linear`` with a trainable weight (not LoRA-wrapped)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if _is_plain_linear(head) and head.weight.requires_grad else None


def _tied_plain_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The input embedding when it is a plain ``nn.Embedding`` sharing its trainable weight with the LM head."""
    try:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not (type(embedding) is torch.nn.Embedding and head is not None and embedding.weight is head.weight):
        return None
    plain = embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse
    return embedding if plain and embedding.weight.requires_grad else None


class _HeadWeightGradAfterBackward(torch.autograd.Function):
    """``F.linear(x, weight)`` whose weight gradient ``grad_out^T @ x`` is added into ``weight.grad`` after the
    backward pass, when ``grad_out`` is smaller than the weight (few supervised tokens, the usual case);
    otherwise it is returned as usual."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        # The parameter object itself: a saved tensor comes back as another Python object, and ``.grad`` must be
        # set on the parameter the optimizer holds.
        ctx.weight = weight
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,), weight = ctx.saved_tensors, ctx.weight
        # Under autocast the forward ran in a lower precision than the fp32 weight: products in grad_out's dtype.
        grad_x = (grad_out @ weight.to(grad_out.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None
        grad_2d, x_2d = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
        if grad_2d.numel() > weight.numel():
            return grad_x, (grad_2d.T @ x_2d).to(weight.dtype)
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: _add_head_weight_grad(weight, grad_2d, x_2d))
        return grad_x, None


def _add_head_weight_grad(weight: torch.Tensor, grad_2d: torch.Tensor, x_2d: torch.Tensor) -> None:
    if weight.grad is None:
        weight.grad = (grad_2d.T @ x_2d).to(weight.dtype)
    else:
        weight.grad.addmm_(grad_2d.T.to(weight.grad.dtype), x_2d.to(weight.grad.dtype))


def _head_forward_with_deferred_weight_grad(self, x: torch.Tensor) -> torch.Tensor:
    return _HeadWeightGradAfterBackward.apply(x, self.weight)


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _SwiGLUDownFunction.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


def _is_plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def _is_llama_rmsnorm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(weight, torch.Tensor) and weight.dim() == 1):
        return False
    # Some "RMSNorm"s differ (Gemma scales by 1 + weight): keep only those computing the Llama formula.
    with torch.no_grad():
        probe = torch.randn(2, weight.shape[0], dtype=weight.dtype, device=weight.device)
        return torch.equal(module(probe), _RMSNormFunction.apply(probe, weight, module.variance_epsilon))


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    if not (all(_is_plain_linear(p) for p in parts) and callable(act)):
        return False
    with torch.no_grad():  # transformers has its own SiLU classes: check the function, not the type
        probe = torch.linspace(-6, 6, 64, dtype=parts[0].weight.dtype, device=parts[0].weight.device)
        return torch.equal(act(probe), F.silu(probe))


def apply_lean_ops(model: torch.nn.Module, *, recompute_norm_outputs: bool = True,
                   defer_head_weight_grad: bool = False) -> int:
    """Swap in the lean forwards on every matching module of ``model`` (norms, MLPs, the LM head or a tied
    embedding); returns the number swapped.

    With ``recompute_norm_outputs`` the swapped norms' outputs are recomputed in the backward pass instead of
    being kept by the projections that read them (hooks around ``model``'s forward). ``defer_head_weight_grad``
    (single process only, not DDP) adds the LM head's weight gradient after the backward pass; see the module
    docstring for both.
    """
    recipes = _NormOutputRecipes() if recompute_norm_outputs else None
    changed = 0
    for module in model.modules():
        if _is_swiglu_mlp(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            changed += 1
        elif _is_llama_rmsnorm(module):
            module.forward = types.MethodType(_lean_rmsnorm_forward, module)
            module._easysft_recipes = recipes
            changed += 1
    if recipes is not None and changed:
        model.register_forward_pre_hook(lambda *_: recipes.__enter__())
        model.register_forward_hook(lambda *_: recipes.__exit__(None, None, None), always_call=True)
    head = _plain_trainable_head(model) if defer_head_weight_grad else None
    if head is not None:
        head.forward = types.MethodType(_head_forward_with_deferred_weight_grad, head)
        head._easysft_defer_weight_grad = True  # the chunked loss (easysft/chunked_ce.py) defers it the same way
        return changed + 1  # a tied embedding's gradient then goes through autograd alone: nothing to add
    embedding = _tied_plain_embedding(model)
    if embedding is not None:
        embedding._easysft_pending_grads = pending = []
        embedding.forward = types.MethodType(_lean_embedding_forward, embedding)
        embedding.weight.register_post_accumulate_grad_hook(lambda w: _add_pending_embedding_grads(w, pending))
        changed += 1
    return changed
