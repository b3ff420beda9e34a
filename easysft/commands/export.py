"""`easysft export`: flags -> ExportConfig -> easysft/export/ (a merged or re-saved HF checkpoint).

    easysft export --model_name_or_path ADAPTER_DIR --merge --output_dir OUT
"""

from __future__ import annotations

from easysft.config import ExportConfig, ModelConfig, add_dataclass_flags, from_flat_dict


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, ExportConfig)


def run(values: dict) -> int:
    model_cfg = from_flat_dict(ModelConfig, values)
    export_cfg = from_flat_dict(ExportConfig, values)
    from easysft.export.checkpoint import export_checkpoint

    print(export_checkpoint(model_cfg, export_cfg))
    return 0
