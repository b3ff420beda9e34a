"""Shared fixtures: the bundled tokenizer, tiny config-built Llama models, small prompt/answer folders.

Everything is offline. The tokenizer is the real SmolLM2 one (pad id 2 != ignore id -100, so mix-ups fail);
models are 2-layer Llamas built from a config with random weights, saved once per session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

QA_ROWS = [
    {"prompt": "Reverse the words: red green blue", "answer": "blue green red"},
    {"prompt": "Reverse the words: one two", "answer": "two one"},
    {"prompt": "What is 2 + 2?", "answer": "4"},
    {"prompt": "Name a primary colour.", "answer": "Red is a primary colour."},
    {"prompt": "Translate 'cat' to French.", "answer": "chat"},
    {"prompt": "Say hello in Japanese.", "answer": "こんにちは"},
    {"prompt": "Give me an emoji for joy.", "answer": "😂 (tears of joy)"},
    {"prompt": "Spell 'abc' backwards.", "answer": "cba"},
]


@pytest.fixture(scope="session")
def tokenizer():
    from easysft.models.bundled import bundled_tokenizer_dir
    from easysft.models.load import load_tokenizer

    return load_tokenizer(str(bundled_tokenizer_dir()))


def make_tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    values.update(overrides)
    config = LlamaConfig(**values)
    config._attn_implementation = values["attn_implementation"]
    return config


def make_tiny_model(tokenizer, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_tiny_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, **overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved 2-layer Llama checkpoint folder (random weights, real tokenizer): a --model_name_or_path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


def write_qa_folder(folder, train_rows=None, eval_rows=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(train_rows or QA_ROWS, ensure_ascii=False), encoding="utf-8")
    (folder / "eval.json").write_text(json.dumps(eval_rows or QA_ROWS[:4], ensure_ascii=False), encoding="utf-8")
    return str(folder)


@pytest.fixture
def qa_data_dir(tmp_path):
    """A folder with train.json (8 rows) and eval.json (4 rows) in the original design's format."""
    return write_qa_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tokenized-data caches go to a per-test folder; the model cache (bundled checkpoint) stays shared."""
    monkeypatch.setenv("EASYSFT_DATA_CACHE", str(tmp_path / "data-cache"))


@pytest.fixture(scope="session")
def launched(request, tmp_path_factory, tiny_model_dir):
    """The 2-process runs every selected distributed test module declares (its ``add_runs``), trained together in
    one torchrun and one deepspeed job (tests/distributed/launches.py); returns the plan (``.folder(name)``)."""
    from tests.distributed.launches import launch_all

    modules = [item.module for item in request.session.items if getattr(item, "module", None) is not None]
    return launch_all(modules, tmp_path_factory.mktemp("launched"), tiny_model_dir)


TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
ASSETS = Path(__file__).resolve().parents[1] / "easysft" / "assets"
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Delhi", "Perth"]


def tool_conversation(k: int) -> dict:
    """A small agent trajectory (tools, a tool call with string arguments, a tool result, reasoning, an answer,
    and for odd k a second round), different for each k."""
    city, temp = CITIES[k % len(CITIES)], 10 + (k * 7) % 20
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}},
             {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}]
    messages = [{"role": "user", "content": f"What is the weather in {city}?"},
                {"role": "assistant", "content": "", "reasoning_content": f"Look up {city}.",
                 "tool_calls": [{"id": f"c{k}", "type": "function",
                                 "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
                {"role": "tool", "tool_call_id": f"c{k}", "content": f"{temp}C"},
                {"role": "assistant", "content": f"It is {temp}C in {city}."}]
    if k % 2:
        messages += [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Glad to help."}]
    return {"tools": tools, "messages": messages}


@pytest.fixture
def tool_data_file(tmp_path):
    """A .jsonl of 8 tool-calling conversations and the ChatML-with-tools template to train them with."""
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(tool_conversation(k)) + "\n" for k in range(8)), encoding="utf-8")
    return str(path), str(ASSETS / "chatml_tools.jinja")
