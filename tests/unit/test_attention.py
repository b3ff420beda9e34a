"""``--attn_implementation``: every CPU-capable backend gives packed == padded (loss and gradients, fp32 1e-5),
``auto`` keeps sdpa on CPU, and the variable-length backends on CUDA agree with padded sdpa (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from easysft.data.collate import collate, pack
from easysft.data.tokenize import tokenize_example
from easysft.errors import ConfigError
from easysft.loss import supervised_loss_sum
from easysft.models.attention import (
    cu_seqlens_from_position_ids,
    resolve_attn_implementation,
    set_attn_implementation,
)

ROWS = [("short?", "yes"), ("a much longer prompt with many more words in it", "an answer of some length"),
        ("mid prompt", "mid"), ("Reverse the words: red green blue", "blue green red")]


def _samples(tokenizer):
    return [tokenize_example(tokenizer, p, a, max_prompt_len=64, max_ans_len=32) for p, a in ROWS]


def test_cu_seqlens_worked_example():
    cu, longest = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1]]))
    assert cu.tolist() == [0, 3, 5] and longest == 3
    cu, longest = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2], [0, 1, 0]]))  # right-padded rows
    assert cu.tolist() == [0, 3, 5, 6] and longest == 3


def test_auto_picks_sdpa_on_cpu_and_a_variable_length_kernel_on_cuda(monkeypatch):
    assert resolve_attn_implementation("auto", "cpu", low_precision=True) == "sdpa"
    assert resolve_attn_implementation("eager", "cuda", low_precision=True) == "eager"
    monkeypatch.setattr("easysft.models.attention._has_module", lambda name: name != "flash_attn")
    assert resolve_attn_implementation("auto", "cuda", low_precision=True) == "varlen"
    assert resolve_attn_implementation("auto", "cuda", low_precision=False) == "flex"  # fp32: exact flex
    monkeypatch.setattr("easysft.models.attention._has_module", lambda name: True)
    assert resolve_attn_implementation("auto", "cuda", low_precision=True) == "flash_attention_2"


@pytest.mark.parametrize("choice", ["flash_attention_2", "flex"])
def test_cuda_only_backends_on_cpu_are_one_clear_error(tokenizer, choice):
    from tests.conftest import make_tiny_model

    with pytest.raises(ConfigError, match=f"--attn_implementation {choice}"):
        set_attn_implementation(make_tiny_model(tokenizer), choice, "cpu")


def _packed_vs_padded(model, samples, pad_id):
    padded = supervised_loss_sum(model, collate(samples, pad_id))
    padded.loss_sum.backward()
    g_padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = supervised_loss_sum(model, pack(samples))
    packed.loss_sum.backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return padded.loss_sum, packed.loss_sum, g_padded, g_packed


@pytest.mark.parametrize("choice", ["sdpa", "eager", "varlen"])  # flex: no backward on CPU (see above)
def test_packed_equals_padded_for_every_cpu_backend(tokenizer, choice):
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tokenizer)
    set_attn_implementation(model, choice, "cpu")
    reference = make_tiny_model(tokenizer)  # same seed, same weights, transformers' sdpa on padded batches
    samples = _samples(tokenizer)
    padded, packed, g_padded, g_packed = _packed_vs_padded(model, samples, tokenizer.pad_token_id)
    ref_loss = supervised_loss_sum(reference, collate(samples, tokenizer.pad_token_id)).loss_sum
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(packed, ref_loss, atol=1e-5, rtol=1e-6)
    for n in g_padded:
        torch.testing.assert_close(g_packed[n], g_padded[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("choice", ["varlen", "flex", "flash_attention_2"])
def test_cuda_variable_length_backends_equal_padded_sdpa_in_bf16(tokenizer, choice):
    from easysft.models.attention import _has_module
    from tests.conftest import make_tiny_model

    if choice == "flash_attention_2" and not _has_module("flash_attn"):
        pytest.skip("flash-attn is not installed")
    model = make_tiny_model(tokenizer, hidden_size=128, num_attention_heads=4).cuda()
    reference = make_tiny_model(tokenizer, hidden_size=128, num_attention_heads=4).cuda()
    set_attn_implementation(model, choice, "cuda")
    samples = _samples(tokenizer)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = supervised_loss_sum(reference, {k: v.cuda() for k, v in collate(samples, tokenizer.pad_token_id).items()})
        got = supervised_loss_sum(model, {k: v.cuda() for k, v in pack(samples).items()})
    ref.loss_sum.backward()
    got.loss_sum.backward()
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, atol=0.05, rtol=1e-2)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        error = float((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-12))
        assert error < 0.05, (n, error)  # bf16: relative error of the whole gradient, not per element
