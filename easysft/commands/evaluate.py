"""`easysft eval`: perplexity of a model on a split (and, with ``--generate N``, generation scores of its first
N rows), as ONE JSON line on stdout (progress on stderr).

The template, max lengths and generation settings saved with the model (easysft.json) are used unless flags
override them.
"""

from __future__ import annotations

import json

from easysft.config import (
    DataConfig,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    add_dataclass_flags,
    from_flat_dict,
    pick_fields,
)


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, DataConfig, EvalConfig, GenerateConfig)


def run(values: dict) -> int:
    from easysft.errors import ConfigError

    if not values.get("data_path"):
        raise ConfigError("--data_path is required.")
    model_cfg = from_flat_dict(ModelConfig, values)
    eval_cfg = from_flat_dict(EvalConfig, values)
    from easysft.evaluation import evaluate_saved_model

    from_flat_dict(GenerateConfig, values)  # bad generation flags fail before any model loads
    from easysft.scoring import load_user_metric

    user_metric = load_user_metric(eval_cfg.eval_metric) if eval_cfg.eval_metric else None  # fails fast
    result = evaluate_saved_model(model_cfg, pick_fields(DataConfig, values), eval_cfg).as_dict()
    if eval_cfg.generate:
        from easysft.generate.scored import score_saved_model

        result |= score_saved_model(model_cfg, from_flat_dict(DataConfig, values), eval_cfg, values, user_metric)
    print(json.dumps(result))
    return 0
