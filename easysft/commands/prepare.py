"""`easysft prepare`: tokenize and cache a dataset, print the data report (and write data_report.json).

Loads only the tokenizer, never the model weights. A later `easysft train` with the same data, tokenizer,
template, length flags and seed finds the cache entry and does no tokenization.
"""

from __future__ import annotations

import os

from easysft.config import (
    DataConfig,
    ModelConfig,
    add_dataclass_flags,
    convert_value,
    from_flat_dict,
    parse_bool,
)
from easysft.config.paths import check_output_folder


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, DataConfig)
    parser.add_argument("--seed", type=int, help="Seed for the eval hold-out and --data_split (default 1234).")
    parser.add_argument("--debug", type=parse_bool, nargs="?", const=True, metavar="BOOL",
                        help="Only the first 64 train / 32 eval rows (as `easysft train --debug`).")
    parser.add_argument("--output_dir", help="Also write data_report.json into this folder.")


def run(values: dict) -> int:
    from easysft.errors import ConfigError

    values = dict(values)
    seed = convert_value("seed", "int", values.pop("seed", 1234))
    debug = convert_value("debug", "bool", values.pop("debug", False))
    output_dir = values.pop("output_dir", None)
    if not values.get("data_path"):
        raise ConfigError("--data_path is required: give a data folder, file or Hugging Face dataset.")
    model_cfg = from_flat_dict(ModelConfig, values)
    data_cfg = from_flat_dict(DataConfig, values)
    if output_dir:  # only data_report.json is written there: a used folder (a run's output) is fine
        check_output_folder(output_dir, may_be_used=True)

    from easysft.data.dataset import prepare_data
    from easysft.data.report import format_report, write_report
    from easysft.models.load import load_tokenizer, resolve_model_path

    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code)
    data = prepare_data(data_cfg, tokenizer, seed=seed, debug=debug)
    print(format_report(data.report))
    if output_dir:
        print(f"report written to {write_report(data.report, os.path.join(output_dir, 'data_report.json'))}")
    return 0
