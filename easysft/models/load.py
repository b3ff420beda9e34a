"""Load a causal LM and its tokenizer from a local folder, a hub id, a LoRA adapter folder, or the bundled default.

Pad-token policy: if the tokenizer has no pad token, the EOS token is used as pad. That is safe because padding
is always masked (attention 0, label -100) and EOS is appended to answers as a real, supervised token id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from easysft.dtypes import torch_dtype
from easysft.errors import ConfigError, ModelError
from easysft.files import read_utf8

EASYSFT_META = "easysft.json"


@dataclass
class ResolvedModel:
    """Where a model's weights and tokenizer live, and what easysft saved with it."""

    path: str  # folder or hub id holding the (base) model weights
    tokenizer_path: str
    adapter_path: str | None  # a PEFT adapter folder applied on top of ``path``
    meta: dict  # contents of easysft.json (template, max lengths, generation defaults) or {}


def _read_json_file(path: Path) -> dict:
    """A JSON object from ``path``; ModelError naming the file when it is unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); restore the file or re-save the "
                         "model.") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: must hold a JSON object; restore the file or re-save the model.")
    return value


def check_weight_files(folder: str | Path) -> None:
    """ModelError naming the file when a local ``*.safetensors`` file is truncated or its header is damaged
    (checked by opening each one: the header and the data size must agree), before any loading starts."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error type for damaged files
            raise ModelError(f"{file}: truncated or corrupted weights file ({str(exc).splitlines()[0]}); "
                             "re-save or re-download the model.") from None


def resolve_model_path(name_or_path: str, _adapters: tuple[Path, ...] = ()) -> ResolvedModel:
    """Map ``--model_name_or_path`` to concrete locations; raise a one-line ModelError when it cannot exist.

    ``_adapters``: the adapter folders already followed (an adapter whose base is itself would recurse forever).
    """
    from easysft.models.bundled import BUNDLED_NAME, bundled_checkpoint_dir

    if name_or_path == BUNDLED_NAME:
        path = str(bundled_checkpoint_dir())
        return ResolvedModel(path, path, None, {})
    folder = Path(name_or_path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelError(f"--model_name_or_path {name_or_path}: is a file; give a checkpoint folder.")
        meta = read_meta(folder)
        if (folder / "adapter_config.json").is_file():
            config_file = folder / "adapter_config.json"
            base = _read_json_file(config_file).get("base_model_name_or_path")
            if not base or not isinstance(base, str):
                raise ModelError(f"{config_file} names no base_model_name_or_path.")
            chain = (*_adapters, folder.resolve())
            base_folder = Path(base).expanduser()
            if base_folder.exists() and base_folder.resolve() in chain:
                raise ModelError(f"{config_file}: base_model_name_or_path {base} leads back to the adapter itself; "
                                 "set it to the base model's folder or hub id.")
            first = _adapters[0] if _adapters else folder
            if not base_folder.exists() and base.startswith((".", "/", "~")):
                raise ModelError(f"--model_name_or_path {first if _adapters else name_or_path}: the adapter's base "
                                 f"model {base} (base_model_name_or_path in {config_file}) no longer exists; "
                                 "restore it or edit that file.")
            base_resolved = resolve_model_path(base, chain)
            tokenizer_path = str(folder) if (folder / "tokenizer_config.json").is_file() else base_resolved.path
            return ResolvedModel(base_resolved.path, tokenizer_path, str(folder), meta)
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"--model_name_or_path {name_or_path}: no config.json (nor adapter_config.json) in that folder; "
                "give a Hugging Face checkpoint folder."
            )
        return ResolvedModel(str(folder), str(folder), None, meta)
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"--model_name_or_path {name_or_path}: no such folder (and not a hub id like org/name).")
    return ResolvedModel(name_or_path, name_or_path, None, {})


def read_meta(folder: str | Path) -> dict:
    """easysft.json saved beside a trained model, or {} for a model easysft did not train."""
    path = Path(folder) / EASYSFT_META
    if not path.is_file():
        return {}
    return _read_json_file(path)


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer at ``path`` (pad = EOS when it has no pad token). ``chat_template``: a Jinja file that
    replaces its chat template (``--chat_template``); ``save_pretrained`` then saves that template with the
    model, so everything that loads the trained model renders as training did."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer at {path} has no EOS token; easysft needs one to end answers.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = read_utf8(chat_template, ConfigError, shown=f"--chat_template {chat_template}",
                                            fix="save the template as UTF-8")
        tokenizer.easysft_chat_template_path = chat_template  # names the template in data errors
        _check_template_syntax(tokenizer, chat_template)
    return tokenizer


def _check_template_syntax(tokenizer, path: str) -> None:
    """ConfigError naming ``path:line`` when the chat template is not valid Jinja (checked by rendering one user
    turn; a template's own refusal of a conversation is met, and reported, per row)."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"--chat_template {path}:{exc.lineno}: not a valid Jinja template ({exc.message}).") from None
    except Exception:  # noqa: BLE001 -- e.g. raise_exception for a lone user turn: not a syntax problem
        pass


def load_model(
    path: str,
    *,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    adapter_path: str | None = None,
    adapter_trainable: bool = False,
    quantization: str = "none",
    double_quant: bool = False,
    device: torch.device | None = None,
):
    """A causal LM in ``dtype`` (CPU; the engine moves it). With ``adapter_path``, the PEFT adapter on top.
    With ``quantization`` ('4bit' / '8bit'), the linear layers quantized by bitsandbytes onto ``device``
    (easysft/models/quantize.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_weight_files(path)
    if adapter_path is not None:
        check_weight_files(adapter_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read a model config from {path}: {str(exc).splitlines()[0]}") from None
    kwargs = {"dtype": torch_dtype(dtype)}
    if quantization and quantization != "none":
        from easysft.models.quantize import quantized_load_kwargs

        kwargs = quantized_load_kwargs(quantization, double_quant=double_quant, device=device or torch.device("cpu"))
    # transformers >= 5.25 turns hub kernels on by default when the `kernels` package is installed, and then every
    # train()/eval() switch re-runs kernels' kernelize, which pops the instance `forward` of each hub-kernel layer
    # (LlamaRMSNorm...): easysft's lean forwards (kernels/lean_ops.py) silently vanish after the first eval, and
    # a compiled model recompiles. 5.24's default, kept on every version.
    kwargs["use_kernels"] = False
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        raise ModelError(
            f"{path} ({config.model_type}) is not a causal language model that transformers can load: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot load model weights from {path}: {str(exc).splitlines()[0]}") from None
    if quantization and quantization != "none":
        from easysft.models.quantize import keep_trainable_layout

        keep_trainable_layout(model)  # before the first eval-mode forward (the probe below) can repack weights
    assert_causal(model, path)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=adapter_trainable)
    return model


@torch.no_grad()
def assert_causal(model, path: str) -> None:
    """Refuse models whose position t sees tokens after t (e.g. a BERT checkpoint that transformers happily
    wraps as ``BertLMHeadModel`` with bidirectional attention): they would read the answer they are trained on.

    Probe: two inputs that differ only in their last token must give the same logits at every earlier position.
    """
    vocab = int(getattr(model.config, "vocab_size", 0) or getattr(model.get_input_embeddings(), "num_embeddings", 8))
    probe = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % max(vocab, 6)
    was_training = model.training
    model.eval()
    logits = model(input_ids=probe).logits.float()
    model.train(was_training)
    if not torch.allclose(logits[0, :3], logits[1, :3], atol=1e-3, rtol=1e-3):
        raise ModelError(
            f"{path} ({model.config.model_type}) attends to later tokens: it is not a causal (decoder-only) "
            "language model; give a decoder-only checkpoint such as Llama, Qwen, Mistral or SmolLM."
        )


def load_model_and_tokenizer(name_or_path: str, *, dtype: str = "fp32", trust_remote_code: bool = False):
    """(model, tokenizer, ResolvedModel) in one call; adapters are applied (frozen) when the path is one."""
    resolved = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=trust_remote_code)
    model = load_model(
        resolved.path, dtype=dtype, trust_remote_code=trust_remote_code, adapter_path=resolved.adapter_path
    )
    return model, tokenizer, resolved


def is_local_model(name_or_path: str) -> bool:
    return name_or_path == "bundled" or os.path.isdir(os.path.expanduser(name_or_path))
