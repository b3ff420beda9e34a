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

Use it only where modules are called normally (single process, DDP): DeepSpeed ZeRO-3 gathers a weight in
its module's forward hook, which the fused MLP tail bypasses for ``down_proj``.
"""

from __future__ import annotations

import types

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
        silu_gate = F.silu(gate)
        grad_weight = None
        if ctx.needs_input_grad[2]:
            hidden = silu_gate * up
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1])
            del hidden
        grad_hidden = grad_out @ down_weight
        grad_up = grad_hidden * silu_gate
        sigmoid_gate = torch.sigmoid(gate)
        # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = grad_hidden * up * sigmoid_gate * (1 + gate * (1 - sigmoid_gate))
        return grad_gate, grad_up, grad_weight


def _lean_rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


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


def apply_lean_ops(model: torch.nn.Module) -> int:
    """Swap in the lean forwards on every matching module of ``model``; returns the number swapped."""
    changed = 0
    for module in model.modules():
        if _is_swiglu_mlp(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            changed += 1
        elif _is_llama_rmsnorm(module):
            module.forward = types.MethodType(_lean_rmsnorm_forward, module)
            changed += 1
    return changed
