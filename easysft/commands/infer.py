"""`easysft infer`: batched generation over a data split into a CSV (or JSONL) of predictions.

Flags are those of ModelConfig, DataConfig, GenerateConfig and InferConfig. Values saved with the model in
``easysft.json`` (template, max lengths, generation defaults) apply unless the flag is given.
"""

from __future__ import annotations

from easysft.config import (
    DataConfig,
    GenerateConfig,
    InferConfig,
    ModelConfig,
    add_dataclass_flags,
    from_flat_dict,
)


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, DataConfig, GenerateConfig, InferConfig)


def run(values: dict) -> int:
    model_cfg = from_flat_dict(ModelConfig, values)
    data_cfg = from_flat_dict(DataConfig, values)
    infer_cfg = from_flat_dict(InferConfig, values)
    from_flat_dict(GenerateConfig, values)  # bad sampling flags fail here, before the model loads

    from easysft.inference import run_inference

    try:
        run_inference(model_cfg, data_cfg, infer_cfg, values)
    finally:
        import torch.distributed as tdist

        # A launcher-started process group is ours to close (avoids a shutdown warning on every rank).
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    return 0
