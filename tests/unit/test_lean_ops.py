"""easysft.kernels.lean_ops (RMSNorm / SwiGLU keep only their inputs) and easysft.kernels.memory (malloc_trim hooks):
same outputs and gradients, less saved activation memory, and only the modules they are meant for."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model

from easysft.kernels import memory
from easysft.kernels.lean_ops import apply_lean_ops


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
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward pass of ``model``'s forward
    (only the last position's logits, so the LM head's full-vocabulary logits do not dwarf the blocks').

    The lean norms' own saved-tensor hooks take precedence over an outer one inside the forward, so their pack
    hook is wrapped: what it returns as a tensor is kept, a recipe costs no tensor memory."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def record(packed):
        if isinstance(packed, torch.Tensor) and packed.untyped_storage().data_ptr() not in params:
            storages[packed.untyped_storage().data_ptr()] = packed.untyped_storage().nbytes()
        return packed

    recipes = {id(r): r for m in model.modules() if (r := getattr(m, "_easysft_recipes", None)) is not None}
    for hooks in recipes.values():
        hooks.pack_hook = lambda tensor, _pack=hooks.pack_hook: record(_pack(tensor))
    try:
        with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
            model(input_ids=input_ids, logits_to_keep=1)
    finally:
        for hooks in recipes.values():
            del hooks.pack_hook  # back to the class's bound hook
    return sum(storages.values())


def test_lean_ops_same_loss_same_gradients_less_memory(tokenizer):
    plain = make_tiny_model(tokenizer, seed=0, intermediate_size=96)
    lean = copy.deepcopy(plain)
    lean_kept_norms = copy.deepcopy(plain)
    # 2 layers: 2 MLPs + 2 x 2 block norms + the final norm + the tied embedding.
    assert apply_lean_ops(lean) == 8
    assert apply_lean_ops(lean_kept_norms, recompute_norm_outputs=False) == 8
    input_ids, labels = _batch(tokenizer)
    loss_plain, grads_plain = _loss_and_grads(plain, input_ids, labels)
    loss_lean, grads_lean = _loss_and_grads(lean, input_ids, labels)
    loss_kept, grads_kept = _loss_and_grads(lean_kept_norms, input_ids, labels)
    assert torch.equal(loss_plain, loss_lean)  # the forward is the same operations in the same order
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_lean[name], grad, atol=1e-5, rtol=1e-5, msg=name)
        # the norm outputs rebuilt in the backward pass are bitwise the forward's: nothing moves at all
        assert torch.equal(grads_kept[name], grads_lean[name]), name
    saved_plain = _saved_activation_bytes(plain, input_ids)
    saved_kept = _saved_activation_bytes(lean_kept_norms, input_ids)
    saved_lean = _saved_activation_bytes(lean, input_ids)
    assert saved_kept < 0.75 * saved_plain, (saved_kept, saved_plain)
    # each block's two norm outputs (q/k/v and gate/up inputs, 2 x hidden per token) are no longer kept
    hidden = lean.config.hidden_size
    norm_outputs = 2 * lean.config.num_hidden_layers * input_ids.numel() * hidden * 4
    assert saved_lean <= saved_kept - norm_outputs, (saved_lean, saved_kept, norm_outputs)


def test_tied_embedding_gradient_added_in_place(tokenizer):
    """The tied embedding/LM-head weight gets the same gradient when the embedding's part is added in place:
    padding tokens get none (as F.embedding), two forwards before one backward, a second backward accumulating
    into ``.grad``, a repeated token."""
    plain = make_tiny_model(tokenizer, seed=0)
    lean = copy.deepcopy(plain)
    apply_lean_ops(lean)
    assert "forward" in vars(lean.model.embed_tokens)
    input_ids, labels = _batch(tokenizer, seed=2)
    input_ids[0, :5] = tokenizer.pad_token_id  # left padding without a mask: later tokens attend to it
    labels[0, :5] = -100
    input_ids[1, 3] = input_ids[1, 4]
    for model in (plain, lean):
        model.zero_grad(set_to_none=True)
        first, second = (model(input_ids=input_ids[i : i + 1], labels=labels[i : i + 1]).loss for i in (0, 1))
        (first + second).backward()  # two embedding backward passes, one accumulation of the weight
        model(input_ids=input_ids, labels=labels).loss.backward()  # accumulates into the existing .grad
    weight = "model.embed_tokens.weight"
    grad_plain = dict(plain.named_parameters())[weight].grad
    grad_lean = dict(lean.named_parameters())[weight].grad
    torch.testing.assert_close(grad_lean, grad_plain, atol=1e-6, rtol=1e-5)
    assert grad_plain[tokenizer.pad_token_id].abs().sum() > 0  # the LM head's part of the padding row stays
    assert lean.model.embed_tokens._easysft_pending_grads == []  # everything was added


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rows", [1, 2])  # head output gradient 24 x vocab (kept: hidden is 32) or 48 x vocab
def test_head_weight_gradient_after_backward(tokenizer, tied, rows):
    """The LM head's weight gradient added after the backward pass equals autograd's (two micro-batches, the
    second accumulating), and is not there yet while the blocks' gradients are computed."""
    plain = make_tiny_model(tokenizer, seed=0, tie_word_embeddings=tied, hidden_size=32)
    lean = copy.deepcopy(plain)
    assert apply_lean_ops(lean, defer_head_weight_grad=True) == 8
    assert "forward" in vars(lean.lm_head) and "forward" not in vars(lean.model.embed_tokens)
    input_ids, labels = _batch(tokenizer, seed=3)
    head_grad_seen_by_block_0 = []
    first_block_param = next(lean.model.layers[0].parameters())
    first_block_param.register_post_accumulate_grad_hook(
        lambda _p: head_grad_seen_by_block_0.append(lean.lm_head.weight.grad is not None))
    micro_batches = [slice(0, 1), slice(1, 2)] if rows == 1 else [slice(0, 2), slice(0, 2)]
    for model in (plain, lean):
        model.zero_grad(set_to_none=True)
        for rows_slice in micro_batches:
            model(input_ids=input_ids[rows_slice], labels=labels[rows_slice]).loss.backward()
    for (name, p_plain), p_lean in zip(plain.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(p_lean.grad, p_plain.grad, atol=1e-6, rtol=1e-5, msg=name)
    if not tied:  # (tied: the embedding's part comes last in any case)
        # kept: added after the backward pass; 48 rows: returned to autograd at once, as without the lean ops
        assert head_grad_seen_by_block_0 == ([False, True] if rows == 1 else [True, True])


def test_untied_or_frozen_embeddings_keep_their_forward(tokenizer):
    untied = make_tiny_model(tokenizer, seed=0, tie_word_embeddings=False)
    assert apply_lean_ops(untied) == 7 and "forward" not in vars(untied.model.embed_tokens)
    frozen = make_tiny_model(tokenizer, seed=0)
    frozen.model.embed_tokens.weight.requires_grad_(False)
    assert apply_lean_ops(frozen) == 7 and "forward" not in vars(frozen.model.embed_tokens)


def test_lean_forwards_survive_train_eval_switches_of_a_loaded_model(tiny_model_dir):
    """transformers >= 5.25 enables hub kernels by default when `kernels` is installed, and re-kernelizes on
    every train()/eval() switch, popping each RMSNorm's instance forward; load_model opts out."""
    from easysft.models.load import load_model

    model = load_model(tiny_model_dir)
    assert apply_lean_ops(model) == 8
    lean = [name for name, module in model.named_modules() if "forward" in vars(module)]
    model.train()
    model.eval()
    model.train()
    assert [name for name, module in model.named_modules() if "forward" in vars(module)] == lean


def test_norm_output_recipes_leave_no_hooks_or_entries_behind(tokenizer):
    """The hooks are active only inside the model's forward (also when it raises), and an entry dies with the
    norm output it describes."""
    model = make_tiny_model(tokenizer, seed=0)
    apply_lean_ops(model)
    recipes = model.model.norm._easysft_recipes
    active_hooks = torch._C._autograd._top_saved_tensors_default_hooks
    seen_inside = []
    model.model.norm.register_forward_hook(lambda *_: seen_inside.append(active_hooks(False)))
    input_ids, labels = _batch(tokenizer)
    _loss_and_grads(model, input_ids, labels)
    assert seen_inside and seen_inside[0] is not None  # inside the forward: the recipes' hooks
    assert active_hooks(False) is None  # outside: none left
    assert recipes.outputs == {}  # every norm output is gone after the backward pass, and so are the entries
    with torch.no_grad():  # no graph: nothing registered
        model(input_ids=input_ids)
    assert recipes.outputs == {}
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.full_like(input_ids, 10**6))  # an out-of-range token id: the forward raises
    assert active_hooks(False) is None


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
    handles = memory.release_freed_memory(model)
    assert len(handles) == 1 + memory.TRIMS_PER_BACKWARD  # after the forward; blocks 1 and 2 of 4
    input_ids, labels = _batch(tokenizer, seed=1)
    model.train()
    _, grads = _loss_and_grads(model, input_ids, labels)
    _, expected = _loss_and_grads(reference, input_ids, labels)
    per_step = 1 + memory.TRIMS_PER_BACKWARD
    assert calls == [0] * per_step
    assert all(torch.equal(grads[name], grad) for name, grad in expected.items())
    model.eval()
    with torch.no_grad():
        model(input_ids)
    assert len(calls) == per_step  # evaluation forwards do not trim
    model.train()
    for handle in handles:
        handle.remove()
    _loss_and_grads(model, input_ids, labels)
    assert len(calls) == per_step  # removed hooks no longer fire


def test_trim_is_real_on_glibc_and_absent_elsewhere(tokenizer, monkeypatch):
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert memory.trim_available()
        # 64 MiB of freed heap chunks, pinned apart so free() alone cannot shrink the heap. Without a trim the
        # resident set stays put (measured: 0 bytes given back); the trim gives back 19 MiB in this test process
        # (torch loaded; all 64 MiB in a bare one). A trim that does nothing fails the 8 MiB bar.
        freed, kept = _resident_bytes_after_free_and_after_trim(lambda _pad: 0)
        assert freed - kept < 2**20, (freed, kept)
        freed, trimmed = _resident_bytes_after_free_and_after_trim(memory._malloc_trim())
        assert freed - trimmed > 8 * 2**20, (freed, trimmed)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory(make_tiny_model(tokenizer)) == []


def _resident_bytes_after_free_and_after_trim(trim) -> tuple[int, int]:
    """Allocate 1,024 heap blocks of 64 KiB (below glibc's mmap threshold) with a small live block after each,
    touch them, free the big ones; return the resident set size right after the frees and after ``trim(0)``."""
    import ctypes
    import ctypes.util
    import os

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, blocks, pins = 64 * 1024, [], []
    for _ in range(1024):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        blocks.append(block)
        pins.append(libc.malloc(64))
    for block in blocks:
        libc.free(block)
    freed = resident()
    trim(0)
    trimmed = resident()
    for pin in pins:
        libc.free(pin)
    return freed, trimmed
