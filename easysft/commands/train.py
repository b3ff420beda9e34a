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
    from easysft.train.loop import train

    train(model_cfg, data_cfg, train_cfg, lora_cfg, gen_cfg)
    return 0
