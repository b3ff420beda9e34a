"""A model folder others can load; ``merge`` folds a LoRA adapter into a full checkpoint.

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

from easysft.config import ExportConfig, ModelConfig
from easysft.config.paths import check_not_read_from, check_output_folder
from easysft.errors import ConfigError, EasySFTError


def check_output_dir(model_cfg: ModelConfig, export_cfg: ExportConfig) -> Path:
    """The output folder, refused before anything loads when it is a file, the source itself, or used."""
    out = Path(export_cfg.output_dir).expanduser()
    source = Path(model_cfg.model_name_or_path).expanduser()
    if source.is_dir() and out.is_dir() and source.resolve() == out.resolve():
        raise ConfigError("--output_dir is the --model_name_or_path folder; export into a different folder.")
    if out.is_dir():
        check_not_read_from(out, _read_folders(model_cfg.model_name_or_path))
    return check_output_folder(export_cfg.output_dir, may_be_used=export_cfg.overwrite_output_dir)


def _read_folders(model_name_or_path: str) -> dict[str, str]:
    """The local folders an export reads: the adapter's base model and the tokenizer's folder (an unresolvable
    path reports itself when the model loads)."""
    from easysft.models.load import resolve_model_path

    try:
        resolved = resolve_model_path(model_name_or_path)
    except EasySFTError:
        return {}
    folders = {"the adapter's base model": resolved.path} if resolved.adapter_path is not None else {}
    folders.setdefault("the tokenizer's folder", resolved.tokenizer_path)
    if resolved.tokenizer_path != resolved.path:
        folders["the tokenizer's folder"] = resolved.tokenizer_path
    return folders


def disk_full_error(out: Path, exc: BaseException) -> ConfigError | None:
    """The one line for an export that met a full disk (its temporaries are already gone); None otherwise."""
    from easysft.files import disk_full_reason

    why = disk_full_reason(exc)
    if why is None:
        return None
    return ConfigError(f"--output_dir {out}: cannot write the export ({why}); its temporary files were removed and "
                       "what the folder held before is unchanged: free space (or give another --output_dir), then "
                       "rerun.")


def load_for_export(model_cfg: ModelConfig, merge: bool):
    """(model, tokenizer, meta, what) in fp32: an adapter merged when ``merge``; ``what`` names the result."""
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path

    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code,
                               chat_template=model_cfg.chat_template)
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
    return model, tokenizer, meta, what


def export_checkpoint(model_cfg: ModelConfig, export_cfg: ExportConfig) -> str:
    """Write the HF folder described in the module docstring; returns a line saying what was written where."""
    from easysft.dtypes import DTYPE_NAMES, torch_dtype
    from easysft.models.save import save_model_folder

    out = check_output_dir(model_cfg, export_cfg)
    model, tokenizer, meta, what = load_for_export(model_cfg, export_cfg.merge)
    is_adapter = hasattr(model, "peft_config")
    if export_cfg.dtype != "fp32":
        model = model.to(torch_dtype(export_cfg.dtype))
        if not is_adapter:
            model.config.dtype = DTYPE_NAMES[export_cfg.dtype]
    try:
        save_model_folder(model, tokenizer, out, meta=meta)
    except Exception as exc:
        error = disk_full_error(out, exc)
        if error is None:
            raise
        raise error from None
    return f"exported a {what} to {out}"
