"""The chunked linear + cross-entropy (easysft/chunked_ce.py) and the loss path that uses it (easysft/loss.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from easysft.chunked_ce import linear_cross_entropy_sum
from easysft.data.collate import collate, pack
from easysft.data.tokenize import tokenize_example
from easysft.loss import _accepts_logits_to_keep, chunkable_head, supervised_loss_sum


def _inputs(n=10, hidden=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, t


def _reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")


@pytest.mark.parametrize("chunk_tokens", [3, 10, 64])  # several chunks (recompute), exactly one, one with room
@pytest.mark.parametrize("defer", [False, True])
def test_same_loss_and_gradients_as_the_plain_path(chunk_tokens, defer):
    h, w, t = _inputs()
    ref = _reference(h, w, t)
    ref.backward(torch.tensor(0.5))
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = linear_cross_entropy_sum(h, w, t, chunk_tokens=chunk_tokens, defer_weight_grad=defer)
    loss.backward(torch.tensor(0.5))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(h.grad, g_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, g_w, atol=1e-5, rtol=1e-5)  # deferred: added after the backward pass


@pytest.mark.parametrize("chunk_tokens", [4, 64])
def test_bf16_autocast_matches_the_plain_path_under_autocast(chunk_tokens):
    h, w, t = _inputs(n=12, hidden=32, vocab=80, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h, w, t)
    ref.backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy_sum(h, w, t, chunk_tokens=chunk_tokens)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(h.grad, g_h, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w.grad, g_w, atol=2e-2, rtol=2e-2)


def _samples(tokenizer):
    rows = [("short?", "yes"), ("a much longer prompt with many words", "an answer of some length"),
            ("mid prompt", "mid")]
    return [tokenize_example(tokenizer, p, a, max_prompt_len=64, max_ans_len=32) for p, a in rows]


@pytest.mark.parametrize("packed", [False, True])
def test_model_loss_takes_the_chunked_path_and_matches_transformers_logits(tokenizer, monkeypatch, packed):
    """The default loss picks the supervised hidden states and runs the chunked head; it equals transformers'
    ``logits_to_keep`` path in value and gradients, and never asks the model for logits."""
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tokenizer)
    assert chunkable_head(model) is model.lm_head
    samples = _samples(tokenizer)
    batch = pack(samples) if packed else collate(samples, tokenizer.pad_token_id)
    calls = []
    monkeypatch.setattr(torch.nn.Linear, "forward",
                        lambda self, x: calls.append(self) or F.linear(x, self.weight, self.bias))
    fast = supervised_loss_sum(model, batch)
    assert model.lm_head not in calls  # the head's own forward never ran: the chunked loss did its work
    fast.loss_sum.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr("easysft.loss.chunkable_head", lambda m: None)  # transformers' logits_to_keep path
    assert _accepts_logits_to_keep(model)
    ref = supervised_loss_sum(model, batch)
    ref.loss_sum.backward()
    torch.testing.assert_close(fast.loss_sum, ref.loss_sum, atol=1e-5, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fast[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_a_head_whose_output_is_post_processed_keeps_the_transformers_path(tokenizer):
    """The probe refuses a model that changes the head's output (a softcapping-like step after the head)."""
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tokenizer)
    model.lm_head.register_forward_hook(lambda module, args, out: torch.tanh(out))
    assert chunkable_head(model) is None
