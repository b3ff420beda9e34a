"""easysft.generate: left padding, per-row stops, input order, padding-aware repetition penalty, settings,
and the infer prompt == the training prompt without the answer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_model

from easysft.config import GenerateConfig
from easysft.data.templates import Template
from easysft.data.tokenize import IGNORE_INDEX, tokenize_example
from easysft.errors import ConfigError
from easysft.generate import (
    PaddingAwareRepetitionPenalty,
    build_prompt_ids,
    can_prefill_separately,
    cut_at_stop,
    generate_ids,
    left_pad,
    length_order,
    plan_batches,
    prefill_cache,
    resolve_settings,
    shard_for_rank,
)

# Lengths 1 .. 28 tokens with the SmolLM2 tokenizer: the longest is more than 4x the shortest.
TEXTS = [
    "Hi",
    "What is two plus two?",
    "Reverse the words: red green blue yellow purple orange black white grey pink brown",
    "Tell me a long story about a cat who lived in a small house by the sea, and the fish it caught every day.",
    "Ok",
    "Name three colours please.",
    "Translate 'good morning' to French and to German.",
]


def test_left_pad_and_helpers():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 9, 2, 7, 2], [2]) == [4, 9]
    assert cut_at_stop([4, 9], [2]) == [4, 9]
    assert length_order([[1], [1, 2, 3], [1, 2], [4, 5, 6]]) == [1, 3, 2, 0]  # longest first, stable


def test_plan_batches_trades_padding_against_batches():
    assert plan_batches([100, 10, 10, 100, 10], max_batch_size=4, overhead_tokens=32) == [[0, 3], [1, 2, 4]]
    # A batch costing more than the padding it saves: one batch.
    assert plan_batches([100, 10, 10, 100, 10], max_batch_size=8, overhead_tokens=1000) == [[0, 3, 1, 2, 4]]
    # Similar lengths: as few batches as the cap allows, every prompt exactly once, longest first.
    lengths = [20, 21, 19, 22, 20, 18, 20]
    batches = plan_batches(lengths, max_batch_size=3, overhead_tokens=960)
    assert len(batches) == 3 and max(len(b) for b in batches) <= 3
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert plan_batches([], 8, 4) == []


def test_shards_cover_every_prompt_once():
    prompts = [[0] * n for n in (3, 9, 1, 4, 4, 7, 2)]
    shards = [shard_for_rank(prompts, rank, 3) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(len(prompts)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_repetition_penalty_ignores_left_padding():
    """A padded row gets the same scores as the row alone; unpadded rows match transformers' processor."""
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    vocab, pad = 20, 2
    row = torch.tensor([[5, 7, 5, 11]])
    scores = torch.randn(1, vocab)
    reference = RepetitionPenaltyLogitsProcessor(2.0)(row, scores.clone())
    assert torch.equal(PaddingAwareRepetitionPenalty(2.0, [0])(row, scores.clone()), reference)
    padded = torch.cat([torch.full((1, 3), pad), row], dim=1)
    assert torch.equal(PaddingAwareRepetitionPenalty(2.0, [3])(padded, scores.clone()), reference)
    # transformers' own processor would also penalise the pad token in the padded row (the bug avoided here).
    assert not torch.equal(RepetitionPenaltyLogitsProcessor(2.0)(padded, scores.clone()), reference)
    # Beam search: 2 prompts x 2 beams -> pad lengths repeat per beam.
    beams = torch.cat([padded, padded, torch.cat([row, row[:, :3]], 1), torch.cat([row, row[:, :3]], 1)])
    out = PaddingAwareRepetitionPenalty(2.0, [3, 0])(beams, scores.repeat(4, 1))
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[0])


def _sequential_reference(model, tokenizer, prompts, max_new_tokens, repetition_penalty):
    """Plain transformers greedy generation, one unpadded prompt at a time, and the smallest top-2 logit gap."""
    refs, margin = [], float("inf")
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition_penalty,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id],
            output_scores=True, return_dict_in_generate=True,
        )
        refs.append(cut_at_stop(out.sequences[0, len(ids):].tolist(), [tokenizer.eos_token_id]))
        for step_scores in out.scores:
            top = step_scores[0].topk(2).values
            margin = min(margin, float(top[0] - top[1]))
    return refs, margin


@pytest.mark.parametrize("repetition_penalty", [1.0, 2.0])
@pytest.mark.parametrize("path", ["bucketed prefill", "padded batches"])
def test_batched_greedy_equals_unbatched(tokenizer, repetition_penalty, path):
    """Both generation paths: prompt pass bucketed by length + one decoding batch (prompts of 2+ tokens), and
    plain left-padded batches (taken when a prompt has a single token, as "Hi" here)."""
    # initializer_range 0.2 makes the random model's logits peaked enough that fp32 noise cannot flip a choice.
    model = make_tiny_model(tokenizer, seed=0, initializer_range=0.2).eval()
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    if path == "bucketed prefill":
        prompts = [ids for ids in prompts if len(ids) >= 2]
    lengths = [len(p) for p in prompts]
    assert max(lengths) >= 4 * min(lengths)
    gen = GenerateConfig(do_sample=False, repetition_penalty=repetition_penalty)
    assert can_prefill_separately(model, prompts, gen, None) == (path == "bucketed prefill")
    refs, margin = _sequential_reference(model, tokenizer, prompts, 10, repetition_penalty)
    assert margin > 1e-3, f"near-tie ({margin}) makes the comparison meaningless; change the seed"
    for batch_size in (1, 3, 8):
        assert generate_ids(model, tokenizer, prompts, gen, max_new_tokens=10, batch_size=batch_size) == refs


def test_prefill_cache_matches_each_prompt_alone(tokenizer):
    """The stitched, left-padded cache gives every row the next-token logits of its prompt run alone (1e-5)."""
    model = make_tiny_model(tokenizer, seed=0).eval()
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS if len(tokenizer(text)["input_ids"]) >= 2]
    prompts = prompts[::-1]  # not in length order: the rows must come back in this order
    with torch.inference_mode():
        input_ids, attention_mask, cache = prefill_cache(model, prompts, tokenizer.pad_token_id, "cpu")
        assert input_ids.shape == (len(prompts), max(map(len, prompts)))
        assert cache.get_seq_length() == input_ids.shape[1] - 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        last = model(input_ids=input_ids[:, -1:], attention_mask=attention_mask, position_ids=position_ids,
                     cache=cache, use_cache=True).logits[:, -1]
        for row, ids in enumerate(prompts):
            alone = model(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(last[row], alone, atol=1e-5, rtol=1e-5)


def test_beams_and_single_token_prompts_take_the_padded_path(tokenizer):
    model = make_tiny_model(tokenizer, seed=0).eval()
    prompts = [[5, 6, 7], [8, 9]]
    assert can_prefill_separately(model, prompts, GenerateConfig(do_sample=False), None)
    assert not can_prefill_separately(model, prompts, GenerateConfig(do_sample=False, num_beams=2), None)
    assert not can_prefill_separately(model, [[5, 6], [7]], GenerateConfig(do_sample=False), None)
    assert not can_prefill_separately(model, prompts, GenerateConfig(do_sample=False), streamer=object())


def test_rows_stop_at_their_own_eos(tokenizer):
    """Force EOS in one row only: that row ends early while the others run to max_new_tokens."""
    model = make_tiny_model(tokenizer, seed=0, initializer_range=0.2).eval()
    eos = tokenizer.eos_token_id
    # Equal lengths: one batch, rows in input order.
    prompts = [tokenizer(text)["input_ids"][:5] for text in TEXTS[1:4]]

    class ForceEos:
        """Batch row 1 (prompt 1) must emit EOS at step 3."""

        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores):
            self.step += 1
            if self.step == 3:
                scores[1, :] = -float("inf")
                scores[1, eos] = 0.0
            return scores

    from easysft.generate import hf as G  # the module generate_ids looks the class up in

    original = G.PaddingAwareRepetitionPenalty
    G.PaddingAwareRepetitionPenalty = lambda penalty, pad_lens: ForceEos()  # type: ignore[assignment]
    try:
        got = generate_ids(model, tokenizer, prompts, GenerateConfig(do_sample=False, repetition_penalty=2.0),
                           max_new_tokens=6, batch_size=3)
    finally:
        G.PaddingAwareRepetitionPenalty = original
    assert len(got[1]) == 2  # two tokens, then the forced EOS (excluded)
    assert [len(got[0]), len(got[2])] == [6, 6]


def test_resolve_settings_precedence(tokenizer):
    meta = {"template": Template.from_name("qa").to_dict(), "max_prompt_len": 64, "max_ans_len": 12,
            "generation": {"temperature": 0.3, "repetition_penalty": 1.5}}
    saved = resolve_settings(meta, tokenizer, {})
    assert saved.template.name == "qa" and (saved.max_prompt_len, saved.max_ans_len) == (64, 12)
    assert saved.generation.temperature == 0.3 and saved.generation.repetition_penalty == 1.5
    assert saved.max_new_tokens == 12  # defaults to max_ans_len
    flags = resolve_settings(meta, tokenizer, {"max_prompt_len": 8, "temperature": 0.9, "max_new_tokens": 3,
                                               "template": "chat"})
    assert flags.template.name == "chat" and flags.max_prompt_len == 8 and flags.max_ans_len == 12
    assert flags.generation.temperature == 0.9 and flags.max_new_tokens == 3
    plain = resolve_settings({}, tokenizer, {})  # a plain HF model: its chat template, its generation_config
    assert plain.template.name == "chat" and plain.generation.repetition_penalty is None
    filled = plain.generation.filled({"temperature": 0.6})  # the model's generation_config, else neutral values
    assert (filled.do_sample, filled.temperature, filled.repetition_penalty, filled.num_beams) == (False, 0.6, 1.0, 1)
    original = resolve_settings({}, tokenizer, {"generation_preset": "original"}).generation.filled({"top_k": 5})
    assert (original.do_sample, original.temperature, original.top_k, original.repetition_penalty) == (True, 0.7,
                                                                                                      50, 2.0)
    assert original.__class__(generation_preset="original", repetition_penalty=1.3).filled().repetition_penalty == 1.3
    with pytest.raises(ConfigError):
        resolve_settings({}, tokenizer, {"max_prompt_len": 0})


@pytest.mark.parametrize("template", ["qa", "chat", "### Instruction:\n{prompt}\n### Response:\n"])
def test_infer_prompt_equals_training_prompt(tmp_path, tiny_model_dir, tokenizer, monkeypatch, template):
    """Through the real `infer` pipeline (model folder with easysft.json, data folder), the prompt ids sent to
    generation are the training sample's ids up to its first supervised token -- truncation included."""
    from conftest import QA_ROWS, write_qa_folder

    from easysft import generate as G
    from easysft.config import DataConfig, InferConfig, ModelConfig
    from easysft.inference import run_inference

    model_dir = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, model_dir)
    max_prompt_len = 12  # short enough that the longer prompts are truncated (their END is kept)
    meta = {"template": Template.from_name(template).to_dict(), "max_prompt_len": max_prompt_len,
            "max_ans_len": 16, "generation": GenerateConfig().__dict__}
    (model_dir / "easysft.json").write_text(json.dumps(meta), encoding="utf-8")
    data_dir = write_qa_folder(tmp_path / "data", eval_rows=QA_ROWS)

    seen = {}

    def fake_generate(model, tok, prompts, gen, **kwargs):
        seen["prompts"], seen["max_new_tokens"] = prompts, kwargs["max_new_tokens"]
        return [[] for _ in prompts]

    monkeypatch.setattr(G, "generate_ids_data_parallel", fake_generate)
    result = run_inference(ModelConfig(str(model_dir)), DataConfig(data_path=[data_dir]),
                           InferConfig(inference_output_path=str(tmp_path / "p.csv")), {})
    assert result.num_prompts == len(QA_ROWS) and seen["max_new_tokens"] == 16
    truncated = 0
    for row, prompt_ids in zip(QA_ROWS, seen["prompts"], strict=True):
        sample = tokenize_example(tokenizer, row["prompt"], row["answer"], max_prompt_len=max_prompt_len,
                                  max_ans_len=16, template=template)
        first_supervised = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
        assert prompt_ids == sample["input_ids"][:first_supervised]
        truncated += sample["prompt_truncated"]
    assert truncated > 0  # the truncation path was exercised


def test_build_prompt_ids_keeps_prompt_end(tokenizer):
    template = Template.from_name("qa")
    full = template.prompt_ids(tokenizer, "one two three four five six seven eight nine ten")
    assert build_prompt_ids(tokenizer, template, "one two three four five six seven eight nine ten", None, 5) == full[-5:]


def test_vllm_backend_without_vllm_is_one_clear_error(monkeypatch):
    from easysft import generate as G

    monkeypatch.setattr(G, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install vllm"):
        G.require_vllm()
