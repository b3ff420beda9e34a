"""`easysft prepare`: tokenize and cache a dataset, print the data report (and write data_report.json).

Loads only the tokenizer, never the model weights. A later `easysft train` with the same data, tokenizer,
template, length flags and seed finds the cache entry and does no tokenization.
"""

from __future__ import annotations

import os
import sys

from easysft.config import DataConfig, ModelConfig, PrepareConfig, add_dataclass_flags, from_flat_dict
from easysft.config.paths import check_output_folder


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, DataConfig, PrepareConfig)


def run(values: dict) -> int:
    from easysft.errors import ConfigError

    if not values.get("data_path"):
        raise ConfigError("--data_path is required: give a data folder, file or Hugging Face dataset.")
    model_cfg = from_flat_dict(ModelConfig, values)
    data_cfg = from_flat_dict(DataConfig, values)
    prepare_cfg = from_flat_dict(PrepareConfig, values)
    if prepare_cfg.output_dir:  # only data_report.json is written there: a used folder (a run's output) is fine
        check_output_folder(prepare_cfg.output_dir, may_be_used=True)

    from easysft.data.dataset import prepare_data
    from easysft.data.report import format_report, write_report
    from easysft.models.load import load_tokenizer, resolve_model_path

    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code,
                               chat_template=model_cfg.chat_template)
    data = prepare_data(data_cfg, tokenizer, seed=prepare_cfg.seed, debug=prepare_cfg.debug)
    as_json = prepare_cfg.show and prepare_cfg.show_format == "jsonl"
    print(format_report(data.report), file=sys.stderr if as_json else sys.stdout)
    if prepare_cfg.show:
        from easysft.data.show import show_samples

        for line in show_samples(tokenizer, data.train, prepare_cfg.show, fmt=prepare_cfg.show_format,
                                 colour=sys.stdout.isatty()):
            print(line)
    if prepare_cfg.output_dir:
        path = write_report(data.report, os.path.join(prepare_cfg.output_dir, "data_report.json"))
        print(f"report written to {path}")
    return 0
