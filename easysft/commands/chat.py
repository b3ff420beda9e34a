"""`easysft chat`: a streaming multi-turn REPL, or one answer on stdout with ``--prompt``.

The template, max lengths and generation defaults saved with the model (easysft.json) apply unless the flag
is given; the generation flags are those of `easysft infer`.
"""

from __future__ import annotations

from easysft.config import ChatConfig, GenerateConfig, ModelConfig, add_dataclass_flags, from_flat_dict


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, GenerateConfig, ChatConfig)


def run(values: dict) -> int:
    model_cfg = from_flat_dict(ModelConfig, values)
    chat_cfg = from_flat_dict(ChatConfig, values)
    from_flat_dict(GenerateConfig, values)  # validate the generation flags before the model loads
    from easysft.chat import run_chat

    return run_chat(model_cfg, chat_cfg, values)
