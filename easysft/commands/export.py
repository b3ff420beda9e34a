"""`easysft export`: write a model folder others can load; ``--merge`` folds a LoRA adapter into a full checkpoint.

    easysft export --model_name_or_path ADAPTER_DIR --merge --output_dir OUT

- an adapter folder with ``--merge`` -> a full HF checkpoint (config.json + model.safetensors) with the LoRA
  updates folded into the weights, plus the tokenizer and easysft.json; it loads with plain
  ``transformers.AutoModelForCausalLM`` and needs neither PEFT nor the base model any more;
- an adapter folder without ``--merge`` -> the adapter re-saved as is (adapter_config.json + weights);
- a full checkpoint (or ``bundled``) -> re-saved as a full checkpoint (``--merge`` has nothing to merge).

The folder is written atomically (easysft/models/save.py): a crash never leaves something that loads as a model.
Merging happens in fp32; ``--dtype`` only sets the dtype of the written weights.
"""

from __future__ import annotations

from pathlib import Path

from easysft.config import ModelConfig, add_dataclass_flags, from_flat_dict


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig)
    parser.add_argument("--output_dir", help="Folder to write the exported model into (required).")
    parser.add_argument("--merge", action="store_true",
                        help="Fold a LoRA adapter into the base weights and write a full checkpoint.")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="dtype of the written weights (default fp32).")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Allow writing into a non-empty folder.")


def run(values: dict) -> int:
    from easysft.errors import ConfigError

    output_dir = values.pop("output_dir", None)
    merge = values.pop("merge", False)
    dtype = values.pop("dtype", "fp32")
    overwrite = values.pop("overwrite_output_dir", False)
    model_cfg = from_flat_dict(ModelConfig, values)
    if not output_dir:
        raise ConfigError("--output_dir is required: the folder to write the exported model into.")
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file; give a folder path.")
    source = Path(model_cfg.model_name_or_path).expanduser()
    if source.is_dir() and out.is_dir() and source.resolve() == out.resolve():
        raise ConfigError("--output_dir is the --model_name_or_path folder; export into a different folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir to replace it.")

    import torch

    from easysft.models.load import TORCH_DTYPES, load_model, load_tokenizer, resolve_model_path
    from easysft.models.save import save_model_folder

    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code)
    # Load (and merge) in fp32: folding B @ A into bf16 weights would round the small LoRA update away.
    model = load_model(resolved.path, dtype="fp32", trust_remote_code=model_cfg.trust_remote_code,
                       adapter_path=resolved.adapter_path)
    meta = dict(resolved.meta)
    if resolved.adapter_path is not None and merge:
        model = model.merge_and_unload()
        meta["merged_from"] = str(Path(resolved.adapter_path).resolve())
        what = "merged full checkpoint"
    elif resolved.adapter_path is not None:
        what = "LoRA adapter (pass --merge for a full checkpoint)"
    else:
        what = "full checkpoint" + (" (--merge: no adapter to merge)" if merge else "")
    if dtype != "fp32":
        model = model.to(TORCH_DTYPES[dtype])
        if resolved.adapter_path is None or merge:
            model.config.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[TORCH_DTYPES[dtype]]
    save_model_folder(model, tokenizer, out, meta=meta)
    print(f"exported a {what} to {out}")
    return 0
