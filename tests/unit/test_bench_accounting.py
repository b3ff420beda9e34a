"""The benchmarks' accounting: FLOPs per tool (hand-computed on SmolLM2-135M's shape), the common timing window,
and the README's benchmark blocks equal to what ``bench/readme_tables.py`` renders from ``bench/results/*.json``.

No benchmark runs here: everything is computed from the checked-in results files and literal numbers.
"""

from __future__ import annotations

import json
import re

import pytest

from bench import readme_tables
from bench.flops import (
    ModelShape,
    attention_flops,
    classic_flops,
    lm_head_positions,
    mfu,
    model_flops,
)
from bench.tables import train_rows
from bench.timing import StepClock

# SmolLM2-135M's config.json (the fields that set its FLOPs).
SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}


@pytest.fixture
def smollm2() -> ModelShape:
    return ModelShape.from_config(SMOLLM2)


def test_shape_counts_match_smollm2_by_hand(smollm2):
    # per layer: q and o 576 x 576, k and v 576 x 192 (3 kv heads x 64), gate/up/down 576 x 1536
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert per_layer == 3_538_944
    assert smollm2.head_dim == 64
    assert smollm2.body_matmul_params == 30 * per_layer == 106_168_320
    assert smollm2.lm_head_params == 49152 * 576 == 28_311_552
    # + 61 RMSNorm weight vectors of 576: the parameter count the training runs report
    assert smollm2.total_params == 134_515_008
    # LoRA r=8 on q (576 -> 576) and v (576 -> 192): 8 x (576 + 576) + 8 x (576 + 192) per layer
    assert smollm2.lora_params(8, ["q_proj", "v_proj"]) == 30 * (9216 + 6144) == 460_800


def test_model_flops_by_hand(smollm2):
    tokens, supervised = 4201, 751  # the quiet run's counts
    # easysft: decoder matmuls on every token, LM head on supervised positions only, x 6
    assert model_flops(smollm2, "full", tokens, supervised) == 6 * (106_168_320 * 4201 + 28_311_552 * 751)
    assert model_flops(smollm2, "full", tokens, supervised) == 2_803_650_527_232
    # TRL on CPU: the LM head on every position
    trl = model_flops(smollm2, "full", tokens, tokens)
    assert trl == 6 * 134_479_872 * 4201 == 3_389_699_653_632
    assert trl - model_flops(smollm2, "full", tokens, supervised) == 6 * 28_311_552 * (4201 - 751)
    # LoRA: x 4 for the frozen weights, plus forward and both gradients of the 460,800 adapter weights
    assert model_flops(smollm2, "lora", 100, 10, lora_params=460_800) == (
        4 * (106_168_320 * 100 + 28_311_552 * 10) + 6 * 460_800 * 100)
    assert classic_flops(134_515_008, "full", 4201) == 6 * 134_515_008 * 4201
    assert classic_flops(134_975_808, "lora", 4201) == 4 * 134_975_808 * 4201


def test_lm_head_positions_per_tool():
    assert lm_head_positions("easysft", 4201, 751) == 751
    assert lm_head_positions("easysft --gradient_checkpointing", 4201, 751) == 751
    assert lm_head_positions("TRL SFTTrainer", 4201, 751) == 4201


def test_attention_flops_by_hand():
    shape = ModelShape(hidden=8, layers=2, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)
    # one 3-token sample: positions attend to 1, 2, 3 tokens -> 4 x 8 x (1 + 2 + 3) = 192 FLOPs per layer forward
    assert attention_flops(shape, "full", [3]) == 3 * 2 * 192
    assert attention_flops(shape, "full", [3, 1]) == 3 * 2 * (192 + 4 * 8 * 1)


def test_mfu_of_the_quiet_run_counts_the_flops_each_tool_does():
    """easysft full on the checked-in quiet run, recomputed by hand: MFU counts 6 x the decoder's matmul weights
    per real token plus 6 x the LM head per SUPERVISED token (issue 19: 57.0% under 6N was about 47% counted this
    way on the 2026-11-28 run); 6N-MFU counts 6 x all parameters per real token."""
    payload = readme_tables.load("train")
    rows = {(r["mode"], r["tool"]): r for r in train_rows(payload)}
    easy, trl = rows[("full", "easysft")], rows[("full", "TRL SFTTrainer")]
    decoder, head = 106_168_320, 28_311_552
    done = 6 * (decoder * easy["timed_tokens"] + head * easy["timed_supervised_tokens"])
    assert easy["mfu"] == pytest.approx(mfu(done, easy["timed_s"], payload["peak_gflops"]))
    classic = 6 * 134_515_008 * easy["timed_tokens"]
    assert easy["mfu_6n"] == pytest.approx(mfu(classic, easy["timed_s"], payload["peak_gflops"]))
    assert easy["mfu"] < easy["mfu_6n"]
    assert trl["mfu"] < trl["mfu_6n"]  # TRL's LM head runs everywhere, so only the norms separate its two counts
    assert trl["mfu"] == pytest.approx(trl["mfu_6n"], rel=1e-3)


def test_step_clock_times_steps_two_to_n():
    clock = StepClock()
    clock.ends, clock.tokens, clock.supervised = [10.0, 13.0, 17.5], [100, 200, 300], [10, 20, 30]
    summary = clock.summary(begin=4.0)
    assert summary["timed_s"] == 7.5  # 17.5 - 10.0: steps 2 and 3, step 1 left out
    assert (summary["timed_steps"], summary["timed_tokens"], summary["timed_supervised_tokens"]) == (2, 500, 50)
    assert (summary["tokens"], summary["supervised_tokens"]) == (600, 60)
    assert summary["extra"]["first_step_s"] == 6.0


def test_readme_and_results_markdown_match_the_results_files():
    assert readme_tables.differences() == []
    assert {"train", "lora"} <= set(readme_tables.readme_blocks(readme_tables.README.read_text(encoding="utf-8")))


def test_the_check_catches_an_edited_figure():
    text = readme_tables.README.read_text(encoding="utf-8")
    block = readme_tables.readme_blocks(text)["train"]
    first_percent = re.search(r"\| (\d+\.\d)% \|", block).group(0)
    tampered_block = block.replace(first_percent, "| 99.9% |", 1)
    assert tampered_block != block
    tampered = text.replace(block, tampered_block)
    assert readme_tables.readme_blocks(tampered)["train"] != readme_tables.render_block("train")
    assert readme_tables.render_readme(tampered) == text


def test_train_results_have_what_the_accounting_needs():
    paths = sorted(readme_tables.RESULTS.glob("train*.json"))
    assert paths
    for path in paths:
        payload = json.loads(path.read_text())
        assert "budget" not in payload["meta"]
        assert ModelShape(**payload["meta"]["model_shape"]).total_params == payload["meta"]["num_params"]
        assert payload["meta"]["timing"] in ("loop", "step_sum")


def test_infer_table_states_both_peers_and_their_ratios():
    from bench.tables import infer_markdown

    def run(path, seconds, identical=True):
        return {"path": path, "label": path, "batch": 1 if path == "sequential" else 4, "seconds": seconds,
                "generated_tokens": 40, "identical": identical, "differing": 0 if identical else 1}

    payload = {"meta": {"machine": "m", "num_prompts": 4, "prompt_tokens": [5, 9], "template": "chat",
                        "max_new_tokens": 10, "repetition_penalty": 2.0, "repeats": 2, "date": "d", "note": "n.",
                        "load_average": {"before": [1.0, 0, 0], "after": [2.0, 0, 0]}},
               "runs": [run("sequential", [8.0, 10.0]), run("hf_batched", [3.0, 4.0], identical=False),
                        run("easysft", [2.0, 2.5])]}
    text = infer_markdown(payload)
    assert "| sequential | 1 | 8.0 | 0.50 | 5.0 | **4.00x** (4.00x) | (reference) |" in text
    assert "| hf_batched | 4 | 3.0 | 1.33 | 13.3 | **1.50x** (1.56x) | no (1 prompts differ) |" in text
    assert "measures batching" in text


def test_hf_batched_peer_equals_one_prompt_at_a_time_without_penalty(tiny_model, tokenizer):
    """The second inference peer is real batched generation: left padding changes no greedy token (fp32)."""
    from bench.bench_infer import hf_batched, sequential

    tiny_model.eval()
    prompts = [tokenizer("Reverse the words: red green blue")["input_ids"], tokenizer("Hi")["input_ids"],
               tokenizer("Here is a list: a, b, c, d, e. Which item comes first?")["input_ids"]]
    stop = [tokenizer.eos_token_id]
    alone = sequential(tiny_model, tokenizer, prompts, 6, 1.0, stop)
    assert hf_batched(tiny_model, tokenizer, prompts, 6, 1.0, stop, batch_size=3) == alone
    assert all(len(out) > 0 for out in alone)
