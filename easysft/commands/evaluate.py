"""`easysft eval`: perplexity of a model on a split, as ONE JSON line on stdout (progress on stderr).

The template and max lengths saved with the model (easysft.json) are used unless flags override them.
"""

from __future__ import annotations

import json

from easysft.config import DataConfig, ModelConfig, add_dataclass_flags, from_flat_dict


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, DataConfig)
    parser.add_argument("--split", choices=("eval", "train"), help="Which split to score (default eval).")
    parser.add_argument("--per_device_eval_batch_size", type=int, help="Samples per batch (default 8).")
    parser.add_argument("--seed", type=int, help="Seed used to split single files (default 1234).")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="Evaluation dtype (default fp32).")


def run(values: dict) -> int:
    from easysft.errors import ConfigError

    if not values.get("data_path"):
        raise ConfigError("--data_path is required.")
    batch_size = values.pop("per_device_eval_batch_size", 8)
    if batch_size < 1:
        raise ConfigError(f"--per_device_eval_batch_size must be at least 1, got {batch_size}.")
    split = values.pop("split", "eval")
    seed = values.pop("seed", 1234)
    dtype = values.pop("dtype", "fp32")
    model_cfg = from_flat_dict(ModelConfig, values)

    from easysft.data.dataset import prepare_data
    from easysft.data.templates import Template
    from easysft.evaluate import evaluate
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path

    resolved = resolve_model_path(model_cfg.model_name_or_path)
    saved = {k: resolved.meta[k] for k in ("max_prompt_len", "max_ans_len") if k in resolved.meta}
    if "template" in resolved.meta:
        template = Template.from_dict(resolved.meta["template"])
        saved["template"] = template.format if template.name == "custom" else template.name
    data_cfg = from_flat_dict(DataConfig, saved | values)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code)
    data = prepare_data(data_cfg, tokenizer, seed=seed)
    samples = data.eval if split == "eval" else data.train
    if not samples:
        raise ConfigError(f"the {split} split has no sample to evaluate.")
    model = load_model(resolved.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                       adapter_path=resolved.adapter_path)
    result = evaluate(model, samples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, progress=True)
    print(json.dumps(result.as_dict()))
    return 0
