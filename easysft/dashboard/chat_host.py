"""Chat from the dashboard: one model loaded at a time, answers through :class:`easysft.chat.ChatSession`, so the
prompt rendering (template, system prompt, history trimmed to ``max_prompt_len``) and the generation settings
(saved defaults < the flags sent with the request) are exactly those of ``easysft chat``.

What can be loaded from a run folder:
- ``final``: the run's final model (a full checkpoint or a LoRA adapter folder, with its ``easysft.json``);
- ``step-N``: a complete resumable checkpoint. Its trainable weights (every weight, or only the adapter) are put
  into the model the run started from (``model_name_or_path`` + LoRA flags of its ``train_config.json``), as
  ``--resume`` would; settings come from the run's ``easysft.json`` when present, else from ``train_config.json``.
  A ``step-N`` folder holding a model folder itself (``config.json`` / ``adapter_config.json``) loads as such.
FSDP and DeepSpeed checkpoints (sharded per rank) are refused with one line: export the final model instead.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

from easysft.dashboard.runs import CHECKPOINTS, COMPLETE, TRAIN_CONFIG, read_json, resolve_inside
from easysft.errors import CheckpointError, ConfigError

GENERATION_KEYS = ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "repetition_penalty",
                   "num_beams")


def model_choices(folder: Path) -> list[dict]:
    """What the chat panel offers for a run: the final model (when saved) and each complete checkpoint."""
    from easysft.dashboard.runs import checkpoints, has_final_model

    choices = [{"key": "final", "label": "final model"}] if has_final_model(folder) else []
    choices += [{"key": c["name"], "label": f"checkpoint {c['name']}"} for c in reversed(checkpoints(folder))
                if c["complete"]]
    return choices


def _settings_meta(folder: Path, config: dict) -> dict:
    """easysft.json of the run, or the same keys rebuilt from train_config.json (a run still training)."""
    meta = read_json(folder / "easysft.json")
    if meta:
        return meta
    from easysft.config import GenerateConfig

    names = {f.name for f in dataclasses.fields(GenerateConfig)}
    return {"template": config.get("template"), "max_prompt_len": config.get("max_prompt_len"),
            "max_ans_len": config.get("max_ans_len"),
            "generation": {k: v for k, v in config.items() if k in names and v is not None}}


def _load_checkpoint_model(run_folder: Path, checkpoint: Path, dtype: str):
    from easysft.checkpoint import load_trainable
    from easysft.config import LoraConfig, pick_fields
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path

    config = read_json(checkpoint / TRAIN_CONFIG) or read_json(run_folder / TRAIN_CONFIG)
    if not config.get("model_name_or_path"):
        raise CheckpointError(f"{checkpoint}: no train_config.json naming model_name_or_path.")
    if not (checkpoint / "model.safetensors").is_file() and not (checkpoint / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{checkpoint}: sharded (FSDP/DeepSpeed) checkpoints cannot be loaded for chat; "
                              "chat with the final model or a single/ddp checkpoint.")
    resolved = resolve_model_path(config["model_name_or_path"])
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=bool(config.get("trust_remote_code")))
    model = load_model(resolved.path, dtype="fp32", trust_remote_code=bool(config.get("trust_remote_code")),
                       adapter_path=resolved.adapter_path, adapter_trainable=True)
    lora_cfg = LoraConfig(**pick_fields(LoraConfig, config))
    if lora_cfg.enabled:
        from easysft.models.lora import apply_lora

        model = apply_lora(model, lora_cfg)
    load_trainable(model, checkpoint)  # the same names training saved (requires_grad marks them, as in training)
    if dtype != "fp32":
        from easysft.dtypes import torch_dtype

        model = model.to(torch_dtype(dtype))
    return model, tokenizer, _settings_meta(run_folder, config)


def load_for_chat(run_folder: Path, which: str, dtype: str):
    """(model in eval mode, tokenizer, meta) for ``which`` ('final' or 'step-N') of ``run_folder``; ``dtype`` may
    be ``auto`` (bf16 on a CUDA GPU with bf16, else fp32)."""
    import torch

    from easysft.dtypes import dtype_for_device
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype_for_device(dtype, device)

    if which == "final":
        folder = run_folder
    else:
        folder = resolve_inside(run_folder / CHECKPOINTS, which)
        if not (folder / COMPLETE).is_file():
            raise CheckpointError(f"{folder}: not a complete checkpoint (no {COMPLETE} marker).")
    if which != "final" and not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
        model, tokenizer, meta = _load_checkpoint_model(run_folder, folder, dtype)
    else:
        resolved = resolve_model_path(str(folder))
        tokenizer = load_tokenizer(resolved.tokenizer_path)
        model = load_model(resolved.path, dtype=dtype, adapter_path=resolved.adapter_path)
        meta = resolved.meta or _settings_meta(run_folder, read_json(run_folder / TRAIN_CONFIG))
    return model.eval().to(device), tokenizer, meta


def clean_turns(history) -> list[dict]:
    """The conversation sent by the page, checked: alternating user/assistant turns of plain text."""
    if not isinstance(history, list):
        raise ConfigError("history must be a list of {role, content} turns.")
    turns = []
    for turn in history:
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant") \
                or not isinstance(turn.get("content"), str):
            raise ConfigError("each history turn needs role 'user' or 'assistant' and a text content.")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


class ChatHost:
    """Holds at most one model; loading another replaces it. One answer is generated at a time."""

    def __init__(self, dtype: str = "auto", loader=load_for_chat) -> None:
        self.dtype = dtype
        self._loader = loader
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._loaded = None

    @property
    def loaded(self) -> tuple[str, str] | None:
        return self._key

    def reply(self, run_folder: Path, which: str, text: str, *, history=None, system: str | None = None,
              generation: dict | None = None, seed: int = 1234, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``text`` after ``history`` with ``which`` model of ``run_folder``, streaming to ``on_text``."""
        from easysft.chat import ChatSession
        from easysft.generate import resolve_settings

        given = {k: v for k, v in (generation or {}).items() if k in GENERATION_KEYS and v is not None}
        turns = clean_turns(history or [])
        with self._lock:
            key = (str(run_folder), which)
            if self._key != key:
                self._loaded = self._key = None  # drop the old model before loading the new one (memory)
                import gc

                gc.collect()
                self._loaded = self._loader(run_folder, which, self.dtype)
                self._key = key
            model, tokenizer, meta = self._loaded
            settings = resolve_settings(meta, tokenizer, given)
            import torch

            torch.manual_seed(seed)
            session = ChatSession(model, tokenizer, settings, system=system or None)
            session.history = turns
            return session.reply(text, on_text=on_text)
