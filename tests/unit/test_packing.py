"""Padding-free packing (rule 5): the collator, the best-fit plan, isolation, and equality with padding."""

from __future__ import annotations

import pytest
import torch

from easysft.data.batching import pack_bins, plan_epoch, plan_packed_epoch
from easysft.data.collate import collate, count_supervised, count_tokens, pack
from easysft.data.tokenize import IGNORE_INDEX, tokenize_example
from easysft.loss import supervised_loss_sum

ROWS = [("short?", "yes"), ("a much longer prompt with many more words in it", "an answer of some length"),
        ("mid prompt", "mid"), ("Reverse the words: red green blue", "blue green red")]


def _samples(tokenizer):
    return [tokenize_example(tokenizer, p, a, max_prompt_len=64, max_ans_len=32) for p, a in ROWS]


# ---- the collator ------------------------------------------------------------------------------------------------


def test_pack_worked_example():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [9, 9]}]
    b = pack(samples)
    assert set(b) == {"input_ids", "position_ids", "labels"}  # no attention_mask: packing is detected from positions
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert count_supervised(b) == 3 and count_tokens(b) == 5


def test_pack_keeps_every_supervised_target_of_real_samples(tokenizer):
    samples = _samples(tokenizer)
    assert count_supervised(pack(samples)) == count_supervised(collate(samples, tokenizer.pad_token_id))
    assert count_tokens(pack(samples)) == count_tokens(collate(samples, tokenizer.pad_token_id))


def test_pack_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="sample 0"):
        pack([{"input_ids": [1, 2], "labels": [1]}])


# ---- the plan ----------------------------------------------------------------------------------------------------


def test_pack_bins_worked_example():
    assert sorted(pack_bins([0, 1, 2, 3], [5, 3, 4, 2], 7)) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("window", [4, 512])
def test_pack_bins_cover_each_sample_once_within_budget(window):
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(300)] + [500]  # one sample over the budget
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bins = pack_bins(order, lengths, 256, window=window, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 256 or len(b) == 1
        assert b == sorted(b, key=order.index)  # inside a row, samples keep the epoch order
    assert bins == pack_bins(order, lengths, 256, window=window, seed=3)  # deterministic
    if window == 512:  # best fit packs tightly: few rows beyond the lower bound
        assert len(bins) <= -(-sum(min(x, 256) for x in lengths) // 256) + 3


def test_packed_plan_is_seeded_and_the_same_bins_on_any_world_size():
    lengths = [7 + (i * 37) % 90 for i in range(41)]
    one = plan_packed_epoch(lengths, max_tokens=200, seed=5, epoch=0).batches
    assert one == plan_packed_epoch(lengths, max_tokens=200, seed=5, epoch=0).batches
    assert one != plan_packed_epoch(lengths, max_tokens=200, seed=5, epoch=1).batches  # reshuffled per epoch
    assert sorted(i for b in one for i in b) == list(range(41))
    for world in (2, 3):
        plans = [plan_packed_epoch(lengths, max_tokens=200, seed=5, epoch=0, rank=r, world_size=world).batches
                 for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # lockstep: the same number of micro-batches on every rank
        interleaved = [plans[r][k] for k in range(len(plans[0])) for r in range(world)]
        assert [b for b in interleaved if b != [None]] == one  # rank r takes bin r of each group of bins
        assert len(interleaved) - len(one) < world  # fillers only in the last group


def test_group_by_length_keeps_epoch_coverage_and_groups_lengths():
    lengths = [(i * 53) % 97 + 1 for i in range(203)]
    for world in (1, 2):
        seen = []
        spreads = []
        for rank in range(world):
            plan = plan_epoch(len(lengths), micro_batch_size=4, seed=1, epoch=2, rank=rank, world_size=world,
                              lengths=lengths)
            seen += [i for b in plan.batches for i in b if i is not None]
            spreads += [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan.batches if None not in b]
        assert sorted(seen) == list(range(len(lengths)))
        assert sorted(spreads)[len(spreads) // 2] <= 5  # median spread; ~50 for random batches of lengths 1..97


# ---- isolation and equality with padding (the model) -------------------------------------------------------------


def _per_sample_loss_in_row(model, samples, which):
    """Loss sum of sample ``which`` inside the packed row of ``samples`` (other samples' labels masked)."""
    masked = [s if k == which else {"input_ids": s["input_ids"], "labels": [IGNORE_INDEX] * len(s["labels"])}
              for k, s in enumerate(samples)]
    return supervised_loss_sum(model, pack(masked)).loss_sum


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_sample_cannot_see_its_neighbours(tokenizer, attn):
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tokenizer, attn_implementation=attn)
    model.eval()  # eval mode would build a KV cache by default: the loss must still isolate samples
    samples = _samples(tokenizer)
    changed = [dict(s) for s in samples]
    changed[0] = {"input_ids": [t + 1 for t in samples[0]["input_ids"]], "labels": samples[0]["labels"]}
    changed[2] = {"input_ids": samples[2]["input_ids"][:-3] + [11, 12, 13], "labels": samples[2]["labels"]}
    with torch.no_grad():
        for which in (1, 3):
            before = _per_sample_loss_in_row(model, samples, which)
            after = _per_sample_loss_in_row(model, changed, which)
            alone = supervised_loss_sum(model, collate([samples[which]], tokenizer.pad_token_id)).loss_sum
            torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(before, alone, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_padded(tokenizer, attn):
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tokenizer, attn_implementation=attn)
    samples = _samples(tokenizer)
    padded = supervised_loss_sum(model, collate(samples, tokenizer.pad_token_id))
    padded.loss_sum.backward()
    g_padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = supervised_loss_sum(model, pack(samples))
    packed.loss_sum.backward()
    assert packed.num_tokens == padded.num_tokens
    torch.testing.assert_close(packed.loss_sum, padded.loss_sum, atol=1e-5, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_padded[n], atol=1e-5, rtol=1e-5, msg=n)


def test_accumulated_packed_rows_equal_one_padded_batch(tokenizer):
    """Two packed rows accumulated with the step's token count == one padded batch of the same samples."""
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tokenizer)
    samples = _samples(tokenizer)
    rows = [pack(samples[:1] + samples[2:3]), pack(samples[1:2] + samples[3:])]
    step_tokens = sum(count_supervised(r) for r in rows)
    for row in rows:
        (supervised_loss_sum(model, row).loss_sum / step_tokens).backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    batch = collate(samples, tokenizer.pad_token_id)
    (supervised_loss_sum(model, batch).loss_sum / count_supervised(batch)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


# ---- the training loop with --packing ----------------------------------------------------------------------------
