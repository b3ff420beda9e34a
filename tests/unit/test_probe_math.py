"""The forgetting probe's numbers by hand (easysft/probe.py): ``probe_nll`` = summed NLL / scored tokens,
``probe_kl`` = mean over scored positions of KL(start || now) = sum_v p_start(v) (log p_start(v) - log p_now(v)).

A 2-layer Llama with a 23-token vocabulary, a perturbed copy of it as "now", and two samples of different lengths
whose prompt tokens are not scored; the reference values are computed per sample (no padding) in float64 with an
explicit sum over the vocabulary, independently of the code's batching, masking and reduction."""

from __future__ import annotations

import copy

import pytest
import torch

from easysft.data.tokenize import IGNORE_INDEX
from easysft.probe import probe_metrics
from tests.conftest import make_tiny_config

VOCAB = 23
SAMPLES = [
    {"input_ids": [3, 5, 7, 9, 11, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 9, 11, 2]},  # 4 scored
    {"input_ids": [4, 6, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 8]},  # 1 scored, shorter: padded in a batch
]


def _models():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    start = AutoModelForCausalLM.from_config(make_tiny_config(VOCAB, pad_token_id=0), dtype=torch.float32).eval()
    now = copy.deepcopy(start)
    with torch.no_grad():
        for param in now.parameters():  # far enough that KL(start||now) and KL(now||start) clearly differ
            param.add_(torch.randn_like(param) * 0.3)
    return start, now


def _by_hand(start, now) -> dict[str, float]:
    nll = kl_start_now = kl_now_start = 0.0
    tokens = 0
    with torch.no_grad():
        for sample in SAMPLES:
            ids = torch.tensor([sample["input_ids"]])
            p_start = torch.softmax(start(ids).logits[0].double(), -1)
            p_now = torch.softmax(now(ids).logits[0].double(), -1)
            for t, target in enumerate(sample["labels"][1:]):  # position t predicts token t + 1
                if target == IGNORE_INDEX:
                    continue
                ps, pn = p_start[t], p_now[t]
                nll += -float(torch.log(pn[target]))
                kl_start_now += sum(float(ps[v] * (torch.log(ps[v]) - torch.log(pn[v]))) for v in range(VOCAB))
                kl_now_start += sum(float(pn[v] * (torch.log(pn[v]) - torch.log(ps[v]))) for v in range(VOCAB))
                tokens += 1
    assert tokens == 5
    return {"nll_sum": nll, "tokens": tokens, "kl": kl_start_now / tokens, "kl_reversed": kl_now_start / tokens,
            "nll": nll / tokens}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_probe_nll_and_kl_match_the_hand_computed_definition(batch_size):
    start, now = _models()
    want = _by_hand(start, now)
    # The test can tell the definitions apart: reversed KL and the unnormalised NLL are far from the values.
    assert abs(want["kl"] - want["kl_reversed"]) > 0.05 * want["kl"]
    assert want["nll_sum"] > 4 * want["nll"]
    got = probe_metrics(now, SAMPLES, reference=start, batch_size=batch_size, pad_token_id=0)
    assert set(got) == {"probe_nll", "probe_kl"}
    assert got["probe_nll"] == pytest.approx(want["nll"], rel=1e-5)
    assert got["probe_kl"] == pytest.approx(want["kl"], rel=1e-4)


def test_probe_kl_is_zero_against_itself_and_nll_is_the_per_token_mean():
    start, _ = _models()
    want = _by_hand(start, start)
    got = probe_metrics(start, SAMPLES, reference=copy.deepcopy(start), batch_size=2, pad_token_id=0)
    assert got["probe_kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["probe_nll"] == pytest.approx(want["nll"], rel=1e-5)
