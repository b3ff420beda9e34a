"""LoRA helpers: --lora_module_name forms, what trains, merging equals PEFT's adapter forward."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from easysft.config import LoraConfig
from easysft.errors import ConfigError
from easysft.models.lora import (
    apply_lora,
    base_weights_train,
    describe_lora,
    linear_module_names,
    lora_module_count,
    merged_state_dict,
    portable_base_name,
    resolve_target_modules,
)

# The tiny Llama has 2 layers x (q, k, v, o, gate, up, down) = 14 linear layers plus lm_head.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _names(layers, parts):
    return sorted(f"model.layers.{i}.{p}" for i in layers for p in parts)


def test_all_linear_excludes_the_output_projection(tiny_model):
    assert resolve_target_modules(tiny_model, "all-linear") == _names((0, 1), LAYER_LINEARS)
    assert "lm_head" not in linear_module_names(tiny_model)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("q_proj,v_proj", _names((0, 1), ("self_attn.q_proj", "self_attn.v_proj"))),
        (" q_proj , v_proj ", _names((0, 1), ("self_attn.q_proj", "self_attn.v_proj"))),
        ("layers.", _names((0, 1), LAYER_LINEARS)),  # the original design's pattern form
        ("layers.0.", _names((0,), LAYER_LINEARS)),
        ("self_attn", _names((0, 1), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.o_proj"))),
        ("layers.1.,o_proj", sorted(set(_names((1,), LAYER_LINEARS)) | set(_names((0,), ("self_attn.o_proj",))))),
        ("model.layers.0.mlp.up_proj", ["model.layers.0.mlp.up_proj"]),
    ],
)
def test_lora_module_name_forms(tiny_model, spec, expected):
    assert resolve_target_modules(tiny_model, spec) == expected


def test_a_module_name_is_not_read_as_a_substring():
    """`up_proj` selects modules CALLED up_proj, never also `gate_up_proj` (a real name in some models)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = torch.nn.Linear(4, 4)
            self.gate_up_proj = torch.nn.Linear(4, 8)

    assert resolve_target_modules(Block(), "up_proj") == ["up_proj"]


@pytest.mark.parametrize("spec", ["qproj", "q_proj,nope", "lm_head", ""])
def test_bad_module_name_is_one_line_listing_valid_names(tiny_model, spec):
    with pytest.raises(ConfigError) as info:
        resolve_target_modules(tiny_model, spec)
    message = str(info.value)
    assert "\n" not in message
    assert "--lora_module_name" in message
    if spec:
        assert "q_proj" in message and "v_proj" in message


def test_only_lora_trains_by_default_and_alpha_defaults_to_twice_the_rank(tiny_model):
    model = apply_lora(tiny_model, LoraConfig(lora_dim=4, lora_module_name="q_proj,v_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 4  # A and B on 4 modules
    cfg = model.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"]  # compact leaf names in adapter_config.json
    assert lora_module_count(model) == 4
    assert not base_weights_train(model)
    assert "base weights frozen" in describe_lora(model, LoraConfig(lora_dim=4))


def test_pattern_targets_are_saved_as_full_names(tiny_model):
    model = apply_lora(tiny_model, LoraConfig(lora_dim=2, lora_module_name="layers.0."))
    assert sorted(model.peft_config["default"].target_modules) == _names((0,), LAYER_LINEARS)
    assert lora_module_count(model) == 7


def test_only_optimize_lora_false_trains_everything_and_says_so(tiny_model):
    cfg = LoraConfig(lora_dim=2, only_optimize_lora=False)
    model = apply_lora(tiny_model, cfg)
    assert all(p.requires_grad for p in model.parameters())
    assert base_weights_train(model)
    line = describe_lora(model, cfg)
    assert "r=2" in line and "14 modules" in line
    assert "base weights also train" in line and "--only_optimize_lora false" in line


def _randomise_lora_b(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero (adapter = identity); make the update visible
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_merged_state_dict_gives_the_adapter_model_logits(tokenizer):
    base = make_tiny_model(tokenizer, seed=3)
    model = apply_lora(base, LoraConfig(lora_dim=4, lora_alpha=16, lora_module_name="all-linear"))
    _randomise_lora_b(model)
    model.eval()
    ids = torch.tensor([tokenizer("Reverse the words: red green blue")["input_ids"]])
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        merged = merged_state_dict(model)
        plain = make_tiny_model(tokenizer, seed=99)
        missing, unexpected = plain.load_state_dict(merged, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        plain.eval()
        merged_logits = plain(input_ids=ids).logits
        peft_merged_logits = model.merge_and_unload()(input_ids=ids).logits
    assert (adapter_logits - merged_logits).abs().max() < 1e-4
    assert (peft_merged_logits - merged_logits).abs().max() < 1e-5


def test_adapter_on_an_adapter_is_refused(tiny_model):
    from peft import PeftModel

    model = apply_lora(tiny_model, LoraConfig(lora_dim=2))
    assert isinstance(model, PeftModel)
    with pytest.raises(ConfigError, match="already a LoRA adapter"):
        apply_lora(model, LoraConfig(lora_dim=2))


def test_portable_base_name(tmp_path, monkeypatch):
    monkeypatch.setenv("EASYSFT_CACHE", str(tmp_path / "cache"))
    bundled = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    bundled.mkdir(parents=True)
    assert portable_base_name(str(bundled)) == "bundled"
    assert portable_base_name("bundled") == "bundled"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert portable_base_name("mine") == str(tmp_path / "mine")
    assert portable_base_name("org/model") == "org/model"
