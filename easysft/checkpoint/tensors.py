"""Tensor and state files inside a checkpoint (also used by the engines to write their part).

Weights are safetensors (sharded past ``MAX_SHARD_BYTES``); optimizer, scheduler and RNG states are ``torch.save``
files of plain containers, read back with ``weights_only=True`` so that loading a checkpoint never runs code.
Every error names the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from easysft.checkpoint.layout import WEIGHTS, WEIGHTS_INDEX
from easysft.errors import CheckpointError
from easysft.files import write_json_atomic

MAX_SHARD_BYTES = 5 * 2**30  # like transformers: keeps single files manageable on every file system


def save_torch_state(obj, path: str | Path) -> None:
    """torch.save of plain containers and tensors only (it must load back under ``weights_only=True``)."""
    torch.save(obj, path)


def load_torch_state(path: str | Path):
    """torch.load with ``weights_only=True``: a checkpoint can never run code; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- torch raises many types for a damaged file; all mean "corrupted"
        # torch's own text is not passed on: it calls any unreadable file "legacy .tar format" and advises
        # weights_only=False, an unsafe load that would run whatever code the file holds.
        raise CheckpointError(f"checkpoint file {path} is corrupted or not a weights-only file (damaged or not "
                              f"written by easysft; it is never loaded unsafely): delete the folder {path.parent} "
                              "and --resume from an earlier checkpoint, or train without --resume.") from None


def save_tensors(tensors: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or shards + ``model.safetensors.index.json`` when over ``max_shard_bytes``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json_atomic(folder / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def load_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read what :func:`save_tensors` wrote. A shard index naming a file outside ``folder`` (absolute path,
    ``..``, or a symlink leading out) is refused: a checkpoint must not make us read arbitrary files."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc}).") from None
        root = folder.resolve()
        for name in files:
            if not isinstance(name, str) or Path(name).is_absolute() or not (root / name).resolve().is_relative_to(root):
                raise CheckpointError(f"{index}: shard {name!r} lies outside the checkpoint folder; refused.")
    else:
        files = [WEIGHTS]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing.")
        try:
            tensors.update(load_file(str(file), device="cpu"))
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error type for damaged files
            raise CheckpointError(f"checkpoint file {file} is corrupted: {str(exc).splitlines()[0]}") from None
    # Bytes flipped inside a tensor keep the file's size and header valid; NaN/inf weights are the usual trace.
    bad = next((name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {folder} is corrupted: tensor {bad} holds NaN or inf values; resume "
                              "from an earlier checkpoint (--resume PATH).")
    return tensors


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (each shared tensor once): all weights, or the adapter under LoRA.
    Frozen weights are not saved: they come back unchanged from --model_name_or_path."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy a checkpoint's trainable weights into ``model`` in place; the names must match exactly."""
    tensors = load_tensors(folder)
    expected = set(trainable_state(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder} does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "resume with the same --model_name_or_path and LoRA flags."
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {folder} does not fit this model: {str(exc).splitlines()[-1].strip()}") from None

