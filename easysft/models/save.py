"""Write a trained model as a standard HF checkpoint folder, atomically, plus easysft.json.

Files are written into a hidden temporary folder inside the destination's parent, then moved into place with
``config.json`` (or ``adapter_config.json``) moved LAST: transformers (and PEFT) only recognise a folder as a model
once that file exists, so a crash part-way never leaves something that loads as a half-written model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from easysft.files import sweep_stale_temporaries, terminate_raises, write_json_atomic
from easysft.models.load import EASYSFT_META

MARKER_FILES = ("config.json", "adapter_config.json")


def save_model_folder(
    model, tokenizer, output_dir: str | Path, *, meta: dict, state_dict=None, merge_lora: bool = False
) -> Path:
    """Save ``model`` (HF or PEFT) + tokenizer + easysft.json into ``output_dir``; safetensors only.

    ``state_dict``: full weights gathered by a sharding engine (ZeRO-3, FSDP); None = the model's own.
    A PEFT model is saved as its adapter (adapter_config.json + adapter_model.safetensors); with ``merge_lora``
    it is saved instead as a full checkpoint with the LoRA updates folded into the weights (needed when the
    base weights trained too, where the adapter alone would not reproduce the model).
    Existing files of the same names in ``output_dir`` are replaced; other files (metrics, logs) are kept.
    """
    output_dir = Path(output_dir)
    check_finite(state_dict if state_dict is not None else model.state_dict(), output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(output_dir)  # what a killed earlier save left behind
    with terminate_raises():  # SIGTERM: the finally below still removes the temporary folder
        _save_into(model, tokenizer, output_dir, meta, state_dict, merge_lora)
    return output_dir


def _save_into(model, tokenizer, output_dir: Path, meta: dict, state_dict, merge_lora: bool) -> None:
    # The pid in the name lets a later save sweep it when this process dies before its clean-up.
    tmp = Path(tempfile.mkdtemp(prefix=f".model-tmp-{os.getpid()}-", dir=output_dir))
    try:
        if merge_lora:
            from easysft.models.lora import merged_state_dict

            state_dict = merged_state_dict(model, state_dict)
            model = model.get_base_model()
            state_dict = _drop_tied_output(model, state_dict)
        kwargs = {"safe_serialization": True} if _takes_safe_serialization(model) else {}
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        model.save_pretrained(tmp, **kwargs)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / EASYSFT_META, meta)
        names = sorted(os.listdir(tmp), key=lambda n: n in MARKER_FILES)  # markers last
        # A folder that held the other kind (adapter vs full model) must stop loading as that kind first:
        # resolve_model_path prefers adapter_config.json, so a stale one would shadow a new full model.
        for stale in set(MARKER_FILES) - set(names):
            if (output_dir / stale).is_file():
                os.remove(output_dir / stale)
        for name in names:
            target = output_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_finite(state_dict: dict, output_dir: Path) -> None:
    """TrainingError when any floating-point weight is NaN or inf: such a model must never be written."""
    import torch

    from easysft.errors import TrainingError

    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(f"not saving the model to {output_dir}: weight {name} holds NaN or inf values; "
                                "lower --learning_rate or check the data, then rerun (or --resume from a checkpoint).")


def _drop_tied_output(model, state_dict: dict) -> dict:
    """Without the output projection's weight when it is tied to the input embedding (else it is saved twice)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return state_dict
    output = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if module is output and output is not None]
    return {k: v for k, v in state_dict.items() if not names or k != names[0] + ".weight"}


def _takes_safe_serialization(model) -> bool:
    import inspect

    try:
        return "safe_serialization" in inspect.signature(model.save_pretrained).parameters
    except (TypeError, ValueError):
        return False
