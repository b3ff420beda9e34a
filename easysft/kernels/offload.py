"""``--offload_activations``: the tensors autograd saves for the backward pass live in CPU memory meanwhile.

PyTorch's saved-tensor hooks see every tensor the forward pass saves: ``pack`` copies it into a (pinned, on CUDA)
CPU tensor, ``unpack`` brings it back to its device when the backward pass needs it. That trades
device-to-host traffic for device memory, which pays off for long rows where activations, not weights, fill the
GPU (the same idea as ``torch.autograd.graph.save_on_cpu``, torchtune's and torchao's activation offloading).

Composition (the contract :func:`offload_saved_activations` keeps):

- Lean activations (easysft/kernels/lean_ops.py) install their own saved-tensor hooks around the model's forward
  to store RMSNorm outputs as recipes. Hooks nest and the innermost wins, so an outer offload context would never
  see a tensor; instead the offload pack/unpack become the lean hooks' ``fallback`` for every tensor that is not
  a recipe. Recipes stay recipes (nothing to move).
- Gradient checkpointing: inside a checkpointed block the checkpoint's own hooks take precedence (its tensors
  are recomputed, not saved); what the blocks save between them is offloaded.
- Numbers are unchanged: a copy out and back is exact (tested: same loss and gradients with and without).

Parameters (``nn.Parameter``) are never copied: autograd saves weights by reference and they stay on the device.
"""

from __future__ import annotations

import torch


class _CpuOffloadHooks:
    """pack/unpack functions that move saved activations to the CPU and back; counts what they moved."""

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.packed_tensors = 0  # for tests and the start-up check: the hooks really see the saved tensors

    def pack(self, tensor: torch.Tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.device.type == "meta" or tensor.numel() == 0:
            return tensor
        copy = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                           pin_memory=self.pin_memory and tensor.device.type == "cuda")
        copy.copy_(tensor, non_blocking=self.pin_memory)
        self.packed_tensors += 1
        return tensor.device, copy

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, copy = packed
        return copy.to(device, non_blocking=copy.is_pinned())


def offload_saved_activations(model: torch.nn.Module, *, pin_memory: bool) -> _CpuOffloadHooks:
    """Offload what ``model``'s forward saves for backward to CPU memory (see the module docstring); returns the
    hooks object (its ``packed_tensors`` counts the offloaded tensors). Call after the lean-activation patches."""
    hooks = _CpuOffloadHooks(pin_memory)
    recipes = next((m._easysft_recipes for m in model.modules()
                    if getattr(m, "_easysft_recipes", None) is not None), None)
    if recipes is not None:  # lean activations' hooks are the innermost: plug in behind them
        recipes.fallback = (hooks.pack, hooks.unpack)
        return hooks
    context = torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)
    model.register_forward_pre_hook(lambda *_: context.__enter__())
    model.register_forward_hook(lambda *_: context.__exit__(None, None, None), always_call=True)
    return hooks
