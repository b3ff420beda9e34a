"""GGUF export pieces without a model (issue 16): the training template as Jinja and as Ollama wrappers, the rope
row permutation, the tokenizer checks."""

from __future__ import annotations

import numpy as np
import pytest

from easysft.data.templates import Template
from easysft.errors import ConfigError
from easysft.export.gguf import ARCHITECTURES, check_exportable, interleave_rope_rows
from easysft.export.gguf_vocab import build_vocab, pre_tokenizer_name
from easysft.export.modelfile import format_chat_template, modelfile_text, role_wrappers

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour {with} \"quotes\""}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "é😂"}],
]


def _render_jinja(source: str, messages: list[dict]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=source, add_generation_prompt=True)
    return rendered[0]


@pytest.mark.parametrize("spec", ["qa", "Instruction:\n{prompt}\n\n### Response:\n", "{{literal}} <{prompt}> end"])
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_format_template_as_jinja_renders_like_training(spec, system):
    template = Template.from_name(spec)
    template = Template(template.name, template.kind, template.format, system)
    source = format_chat_template(template)
    for messages in CONVERSATIONS:
        expected_system = [messages[0]] if messages[0]["role"] == "system" else []
        turns = [m for m in messages if m["role"] != "system"]
        expected = template.render_text(turns[-1]["content"], turns[:-1])
        if expected_system:  # an explicit system message replaces the template's own
            bare = Template(template.name, template.kind, template.format, expected_system[0]["content"])
            expected = bare.render_text(turns[-1]["content"], turns[:-1])
        assert _render_jinja(source, messages) == expected


def test_role_wrappers_reproduce_smollm2_chat_template(tokenizer):
    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    wrappers = role_wrappers(render)
    assert wrappers is not None
    assert wrappers.pre["user"] == "<|im_start|>user\n" and wrappers.post["user"] == "<|im_end|>\n"
    assert wrappers.generation == "<|im_start|>assistant\n"
    assert wrappers.head.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    for messages in CONVERSATIONS:
        assert wrappers.render(messages, True) == render(messages, True)


def test_a_template_the_wrappers_cannot_express_is_left_to_the_runtime():
    def numbered(messages, add_generation_prompt):  # depends on the turn index: no fixed per-role wrapper
        return "".join(f"{i}:{m['content']}|" for i, m in enumerate(messages)) + ("go" if add_generation_prompt else "")

    assert role_wrappers(numbered) is None


def test_modelfile_has_from_template_stop_and_saved_generation(tokenizer):
    from easysft.config import GenerateConfig

    text = modelfile_text("model.gguf", Template.from_name("chat"), tokenizer,
                          GenerateConfig(do_sample=False, repetition_penalty=1.1), 64)
    assert text.splitlines()[1] == "FROM ./model.gguf"
    assert '{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert "PARAMETER repeat_penalty 1.1" in text and "PARAMETER num_predict 64" in text


def test_interleave_rope_rows_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads, kv_heads in ((8, 8), (8, 2)):
        rows = weight[: kv_heads * 16]
        processor = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
        name = "blk.0.attn_k.weight" if kv_heads != heads else "blk.0.attn_q.weight"
        back = processor.process(interleave_rope_rows(rows, kv_heads), name).weights
        np.testing.assert_array_equal(back, rows)
        assert not np.array_equal(interleave_rope_rows(rows, kv_heads), rows)


def test_unsupported_configs_are_refused_with_the_supported_list():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(ConfigError, match="supported: llama, qwen2, qwen3"):
        check_exportable(GPT2Config())
    with pytest.raises(ConfigError, match="rope scaling 'llama3'"):
        check_exportable(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}))
    with pytest.raises(ConfigError, match="biases"):
        check_exportable(LlamaConfig(attention_bias=True))
    assert check_exportable(LlamaConfig()) is ARCHITECTURES["llama"]


def test_vocab_metadata_of_the_bundled_tokenizer(tokenizer):
    import gguf

    vocab = build_vocab(tokenizer, len(tokenizer) + 3)
    assert len(vocab.tokens) == len(tokenizer) + 3 and vocab.tokens[-1] == f"[PAD{len(tokenizer) + 2}]"
    assert vocab.token_types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert vocab.token_types[-1] == gguf.TokenType.UNUSED
    assert vocab.token_types[500] == gguf.TokenType.NORMAL
    assert len(vocab.merges) == 48900 and all(len(m.split(" ")) == 2 for m in vocab.merges[:100])
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert vocab.add_bos is False and vocab.add_eos is False
    with pytest.raises(ConfigError, match="only"):
        build_vocab(tokenizer, 10)


def test_pre_tokenizer_names():
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    qwen = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}},
                                                  {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": qwen}) == "qwen2"
    with pytest.raises(ConfigError, match="no llama.cpp name"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})
