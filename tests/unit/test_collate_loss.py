"""Padding invariance and the supervised-only LM head (rules 1, 3, 5)."""

import pytest
import torch

from easysft.data.collate import collate, count_supervised
from easysft.data.tokenize import IGNORE_INDEX, tokenize_example
from easysft.loss import supervised_loss_sum


def test_collate_worked_example():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    b = collate(samples, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert count_supervised(b) == 3


def test_collate_pads_to_longest_not_max_length():
    b = collate([{"input_ids": [1] * 3, "labels": [1] * 3}] * 2, pad_token_id=2)
    assert b["input_ids"].shape == (2, 3)


def _samples(tokenizer):
    rows = [("short?", "yes"), ("a much longer prompt with many more words in it", "an answer of some length"),
            ("mid prompt", "mid")]
    return [tokenize_example(tokenizer, p, a, max_prompt_len=64, max_ans_len=32) for p, a in rows]


def test_loss_of_a_sample_is_the_same_alone_and_in_a_padded_batch(tokenizer, tiny_model):
    tiny_model.eval()
    samples = _samples(tokenizer)
    batch = collate(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        # Per-sample loss sums inside the batch: compute on each row slice of the padded batch.
        for i, s in enumerate(samples):
            alone = supervised_loss_sum(tiny_model, collate([s], tokenizer.pad_token_id))
            row = {k: v[i : i + 1] for k, v in batch.items()}
            padded = supervised_loss_sum(tiny_model, row)
            assert alone.num_tokens == padded.num_tokens
            torch.testing.assert_close(alone.loss_sum, padded.loss_sum, atol=1e-5, rtol=1e-5)
        total = supervised_loss_sum(tiny_model, batch)
        summed = sum(supervised_loss_sum(tiny_model, collate([s], tokenizer.pad_token_id)).loss_sum for s in samples)
        torch.testing.assert_close(total.loss_sum, summed, atol=1e-4, rtol=1e-5)


def test_supervised_only_logits_match_full_computation_in_value_and_gradient(tokenizer, tiny_model):
    batch = collate(_samples(tokenizer), tokenizer.pad_token_id)
    fast = supervised_loss_sum(tiny_model, batch, supervised_only=True)
    fast.loss_sum.backward()
    g_fast = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    full = supervised_loss_sum(tiny_model, batch, supervised_only=False)
    full.loss_sum.backward()
    assert fast.num_tokens == full.num_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fast.loss_sum, full.loss_sum, atol=1e-5, rtol=1e-6)
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(g_fast[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_loss_matches_hand_computation(tokenizer, tiny_model):
    sample = _samples(tokenizer)[1]
    batch = collate([sample], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"]).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        expected = 0.0
        for t in range(len(sample["input_ids"]) - 1):
            target = sample["labels"][t + 1]
            if target != IGNORE_INDEX:
                expected -= logp[t, target].item()
        got = supervised_loss_sum(tiny_model, batch)
    assert got.loss_sum.item() == pytest.approx(expected, rel=1e-5)
