"""easysft.train.lean_ops (RMSNorm / SwiGLU keep only their inputs) and easysft.train.memory (malloc_trim hooks):
same outputs and gradients, less saved activation memory, and only the modules they are meant for."""

from __future__ import annotations

import copy

import torch
from conftest import make_tiny_model

from easysft.train import memory
from easysft.train.lean_ops import apply_lean_ops


def _batch(tokenizer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, len(tokenizer), (2, 24), generator=generator)
    labels = input_ids.clone()
    labels[:, :10] = -100
    return input_ids, labels


def _loss_and_grads(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _saved_activation_bytes(model, input_ids) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward of the decoder blocks (the LM
    head's full-vocabulary logits would dwarf them in a tiny model)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in params:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(input_ids=input_ids)
    return sum(storages.values())


def test_lean_ops_same_loss_same_gradients_less_memory(tokenizer):
    plain = make_tiny_model(tokenizer, seed=0, intermediate_size=96)
    lean = copy.deepcopy(plain)
    # 2 layers: 2 MLPs + 2 x 2 block norms + the final norm.
    assert apply_lean_ops(lean) == 7
    input_ids, labels = _batch(tokenizer)
    loss_plain, grads_plain = _loss_and_grads(plain, input_ids, labels)
    loss_lean, grads_lean = _loss_and_grads(lean, input_ids, labels)
    assert torch.equal(loss_plain, loss_lean)  # the forward is the same operations in the same order
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_lean[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    saved_plain = _saved_activation_bytes(plain, input_ids)
    saved_lean = _saved_activation_bytes(lean, input_ids)
    assert saved_lean < 0.75 * saved_plain, (saved_lean, saved_plain)


def test_lean_ops_leave_other_modules_alone(tokenizer):
    from peft import LoraConfig, get_peft_model

    class ShiftedRMSNorm(torch.nn.Module):
        """Gemma-style: scales by (1 + weight), not weight -- must keep its own forward."""

        def __init__(self, size):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(size))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    norm = ShiftedRMSNorm(8)
    assert apply_lean_ops(norm) == 0 and "forward" not in vars(norm)

    # LoRA on the MLP projections: those MLPs keep transformers' forward (the adapters must run); norms still change.
    model = make_tiny_model(tokenizer, seed=0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "down_proj"], lora_dropout=0.0))
    assert apply_lean_ops(model) == 5
    assert all("forward" not in vars(layer.mlp) for layer in model.base_model.model.model.layers)


def test_trim_hooks_fire_without_changing_gradients(tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    model = make_tiny_model(tokenizer, seed=0, num_hidden_layers=4)
    reference = copy.deepcopy(model)
    assert memory.decoder_layers(model) == list(model.model.layers)
    handles = memory.release_freed_memory_during_backward(model)
    assert len(handles) == memory.TRIMS_PER_BACKWARD  # blocks 0, 1 and 2 of 4
    input_ids, labels = _batch(tokenizer, seed=1)
    _, grads = _loss_and_grads(model, input_ids, labels)
    _, expected = _loss_and_grads(reference, input_ids, labels)
    assert calls == [0] * memory.TRIMS_PER_BACKWARD
    assert all(torch.equal(grads[name], grad) for name, grad in expected.items())
    for handle in handles:
        handle.remove()
    _loss_and_grads(model, input_ids, labels)
    assert len(calls) == memory.TRIMS_PER_BACKWARD  # removed hooks no longer fire


def test_trim_is_real_on_glibc_and_absent_elsewhere(tokenizer, monkeypatch):
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert memory.trim_available()
        assert memory._malloc_trim()(0) in (0, 1)  # the real call: 1 if memory was released
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory_during_backward(make_tiny_model(tokenizer)) == []
