"""The memory estimate's arithmetic (issue 18): meta-device parameter counts equal the real model's, and each
lever moves the component it should (the end-to-end accuracy is in tests/integration/test_memory_estimate.py)."""

from __future__ import annotations

import pytest
import torch

from easysft.training.memory_estimate import StepShape, count_params, estimate_memory, largest_step
from tests.conftest import make_tiny_config, make_tiny_model


def test_meta_counts_equal_the_real_model(tokenizer):
    model = make_tiny_model(tokenizer)
    counts = count_params(model.config, lora_rank=4, lora_module_name="q_proj,v_proj")
    assert counts.total == sum(p.numel() for p in model.parameters())
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert counts.quantizable == sum(m.weight.numel() for m in linears)
    targets = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert counts.lora == sum(4 * (m.in_features + m.out_features) for m in targets)


def test_each_lever_moves_its_component():
    counts = count_params(make_tiny_config(49152, hidden_size=256, intermediate_size=512), lora_rank=16)
    step = StepShape(rows=8, row_tokens=512, supervised_tokens=2000)
    full = estimate_memory(counts, step, lora=False)
    assert full.weights == full.gradients == counts.total * 4 and full.optimizer == counts.total * 8
    assert estimate_memory(counts, step, lora=False, optim="adamw_8bit").optimizer < 0.27 * full.optimizer
    assert estimate_memory(counts, step, lora=False, optim="adamw_4bit").optimizer < 0.14 * full.optimizer
    lora = estimate_memory(counts, step, lora=True)
    assert lora.gradients == counts.lora * 4 and lora.optimizer == counts.lora * 8
    qlora = estimate_memory(counts, step, lora=True, quantization="4bit")
    double = estimate_memory(counts, step, lora=True, quantization="4bit", double_quant=True)
    assert double.weights < qlora.weights < estimate_memory(counts, step, lora=True, quantization="8bit").weights
    assert estimate_memory(counts, step, lora=False, engine="fsdp", world_size=4).optimizer == full.optimizer // 4
    zero1 = estimate_memory(counts, step, lora=False, engine="deepspeed", zero_stage=1, world_size=2)
    assert zero1.weights == full.weights and zero1.optimizer == full.optimizer // 2
    bf16w = estimate_memory(counts, step, lora=False, dtype="bf16", bf16_weights=True)
    assert bf16w.weights == bf16w.gradients == counts.total * 2 and bf16w.optimizer == counts.total * 12
    assert bf16w.activations < estimate_memory(counts, step, lora=False, dtype="bf16").activations
    ckpt = estimate_memory(counts, step, lora=False, checkpointing=True)
    assert ckpt.activations < full.activations
    assert estimate_memory(counts, step, lora=False, lean=False).activations > full.activations
    cuda = torch.device("cuda")
    assert (estimate_memory(counts, step, lora=False, offload=True, device=cuda).activations
            < estimate_memory(counts, step, lora=False, device=cuda).activations)


@pytest.mark.parametrize("packing,max_tokens,expected", [(False, None, (2, 9)), (True, None, (1, 14)),
                                                         (True, 10, (1, 10))])
def test_largest_step_is_the_longest_padded_rows_or_fullest_packed_row(packing, max_tokens, expected):
    samples = [{"input_ids": [0] * n, "labels": [-100] * (n - 2) + [1, 1]} for n in (3, 9, 5, 4)]
    step = largest_step(samples, batch_size=2, packing=packing, packing_max_tokens=max_tokens)
    assert (step.rows, step.row_tokens) == expected


def test_largest_step_reads_a_cached_split_through_its_arrays(tmp_path):
    """On a memory-mapped split the estimate uses the offsets and the mask file (never sample by sample) and
    gives what the list of the same samples gives."""
    from easysft.data import cache

    samples = [{"input_ids": [1] * n, "labels": [-100] * (n - k) + [1] * k} for n, k in ((3, 1), (9, 2), (5, 5), (4, 3))]
    cache.save_entry(str(tmp_path), "k", samples, [], {}, {})
    view = cache.load_entry(str(tmp_path), "k").train
    for packing, max_tokens in ((False, None), (True, None), (True, 10)):
        assert (largest_step(view, batch_size=2, packing=packing, packing_max_tokens=max_tokens)
                == largest_step(samples, batch_size=2, packing=packing, packing_max_tokens=max_tokens))


def test_the_lm_head_term_follows_the_chunked_loss():
    """Single process and DDP run the head through easysft/chunked_ce.py: at most one chunk of fp32 logits (256 MiB
    on CUDA), however many supervised tokens; FSDP2/ZeRO-3 project every supervised position at once."""
    from easysft.chunked_ce import default_chunk_tokens

    counts = count_params(make_tiny_config(128256, hidden_size=64, intermediate_size=128))
    cuda = torch.device("cuda")
    small, big = (StepShape(rows=1, row_tokens=4096, supervised_tokens=n) for n in (100, 3000))
    chunk = default_chunk_tokens(counts.vocab, "cuda")
    assert 100 < chunk < 3000
    single = {s.supervised_tokens: estimate_memory(counts, s, lora=False, device=cuda).activations for s in (small, big)}
    assert single[3000] - single[100] == 3 * (chunk - 100) * counts.vocab * 4
    fsdp = {s.supervised_tokens: estimate_memory(counts, s, lora=False, engine="fsdp", world_size=2,
                                                  device=cuda).activations for s in (small, big)}
    assert fsdp[3000] - fsdp[100] == 3 * 2900 * counts.vocab * 4
