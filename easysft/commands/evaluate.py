"""`easysft eval`: perplexity of a model on a split, as ONE JSON line on stdout (progress on stderr).

The template and max lengths saved with the model (easysft.json) are used unless flags override them.
"""

from __future__ import annotations

import json

from easysft.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    add_dataclass_flags,
    from_flat_dict,
    pick_fields,
)


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, DataConfig, EvalConfig)


def run(values: dict) -> int:
    from easysft.errors import ConfigError

    if not values.get("data_path"):
        raise ConfigError("--data_path is required.")
    model_cfg = from_flat_dict(ModelConfig, values)
    eval_cfg = from_flat_dict(EvalConfig, values)
    from easysft.evaluation import evaluate_saved_model

    result = evaluate_saved_model(model_cfg, pick_fields(DataConfig, values), eval_cfg)
    print(json.dumps(result.as_dict()))
    return 0
