"""`easysft train`: the original design's training flags -> configs -> ``easysft.train``."""

from __future__ import annotations

from easysft.config import (
    DataConfig,
    GenerateConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    add_dataclass_flags,
    from_flat_dict,
)

CONFIG_CLASSES = (ModelConfig, DataConfig, TrainConfig, LoraConfig, GenerateConfig)


def add_arguments(parser) -> None:
    for cls in CONFIG_CLASSES:
        add_dataclass_flags(parser, cls, title=cls.__doc__.splitlines()[0])


def build_configs(values: dict):
    """Flat flag values -> (model, data, train, lora, generate) configs; validation errors are ConfigErrors."""
    from easysft.errors import ConfigError

    if not values.get("data_path"):
        raise ConfigError("--data_path is required: a folder with train.json/eval.json, a data file, or a dataset.")
    return tuple(from_flat_dict(cls, values) for cls in CONFIG_CLASSES)


def run(values: dict) -> int:
    model_cfg, data_cfg, train_cfg, lora_cfg, gen_cfg = build_configs(values)
    from easysft.training.loop import train

    try:
        train(model_cfg, data_cfg, train_cfg, lora_cfg, gen_cfg)
    except Exception as exc:
        _name_the_rank(exc)
        raise
    return 0


def _name_the_rank(exc: Exception) -> None:
    """Under a launcher, say which rank failed (one line) before the error propagates and the process exits.

    The launcher (torchrun's agent, DeepSpeed's launch.py) then stops the other ranks, which would otherwise wait
    in a collective for the failed one."""
    import os
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"easysft: rank {os.environ.get('RANK', '?')}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
