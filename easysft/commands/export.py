"""`easysft export`: flags -> ExportConfig -> easysft/export/ (a merged or re-saved HF checkpoint, or GGUF).

    easysft export --model_name_or_path ADAPTER_DIR --merge --output_dir OUT
    easysft export --model_name_or_path RUN --format gguf --gguf_type q8_0 --output_dir OUT   (llama.cpp, Ollama)
"""

from __future__ import annotations

from easysft.config import ExportConfig, ModelConfig, add_dataclass_flags, from_flat_dict


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, ExportConfig)


def run(values: dict) -> int:
    model_cfg = from_flat_dict(ModelConfig, values)
    export_cfg = from_flat_dict(ExportConfig, values)
    if export_cfg.format == "gguf":
        from easysft.export.gguf import export_gguf

        print(export_gguf(model_cfg, export_cfg))
        return 0
    from easysft.export.checkpoint import export_checkpoint

    print(export_checkpoint(model_cfg, export_cfg))
    return 0
