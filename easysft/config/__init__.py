"""Typed run settings.

Every command-line flag is a field of one of the dataclasses below; the field name IS the flag name (the
original design's names are kept verbatim: ``--per_device_train_batch_size``, ``--max_prompt_len`` ...).
The CLI and ``--config run.yaml`` both fill these dataclasses through :func:`build_parser` and
:func:`from_flat_dict`; validation happens in ``__post_init__`` so a bad value fails before any model loads.

Library functions take the sub-config they need (``DataConfig``, ``TrainConfig`` ...), never the whole
``argparse.Namespace``.
"""

import dataclasses

from easysft.config.dashboard import DashboardConfig
from easysft.config.fields import BACKENDS, ENGINES, LR_SCHEDULERS, RESUME_SENSITIVE
from easysft.config.flags import (
    add_dataclass_flags,
    from_flat_dict,
    load_yaml_config,
    parse_bool,
    pick_fields,
    to_jsonable,
)
from easysft.config.generation import (
    ChatConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    InferConfig,
    PrepareConfig,
)
from easysft.config.inputs import DataConfig, ModelConfig, parse_data_split
from easysft.config.training import LoraConfig, TrainConfig
from easysft.config.values import check_seed, convert_value, normalise_fields
from easysft.dtypes import DTYPES

# One name per line: engineers add configs in parallel, and single-line additions merge cleanly.
__all__ = [
    "BACKENDS",
    "ChatConfig",
    "DTYPES",
    "DashboardConfig",
    "DataConfig",
    "ENGINES",
    "EvalConfig",
    "ExportConfig",
    "GenerateConfig",
    "InferConfig",
    "LR_SCHEDULERS",
    "LoraConfig",
    "ModelConfig",
    "PrepareConfig",
    "RESUME_SENSITIVE",
    "TrainConfig",
    "add_dataclass_flags",
    "check_seed",
    "convert_value",
    "from_flat_dict",
    "load_yaml_config",
    "normalise_fields",
    "parse_bool",
    "parse_data_split",
    "pick_fields",
    "resume_sensitive_keys",
    "to_jsonable",
]


def resume_sensitive_keys() -> tuple[str, ...]:
    """Names of every config field marked ``resume_sensitive`` (see :data:`RESUME_SENSITIVE`)."""
    return tuple(f.name for cls in (ModelConfig, DataConfig, LoraConfig, TrainConfig) for f in dataclasses.fields(cls)
                 if f.metadata.get(RESUME_SENSITIVE))


