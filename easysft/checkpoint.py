"""Resumable checkpoints: ``output_dir/checkpoints/step-N/``, atomic through a completion marker, with retention.

One checkpoint folder holds::

    model.safetensors           trainable weights: every weight for full fine-tuning, the adapter for LoRA
                                (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` when large)
    optimizer.pt  scheduler.pt  torch.save of the state dicts, read back with ``torch.load(weights_only=True)``
    (scaler.pt)                 the fp16 GradScaler, when there is one
                                -- the lines above: single engine, and DDP (written by rank 0). Sharded engines
                                write their own files through ``engine.save_checkpoint(path)``:
    fsdp/                       FSDP2: torch.distributed.checkpoint shards (``*.distcp``, ``.metadata``) of the
                                trainable weights and optimizer; + scheduler.pt
    deepspeed/state/            DeepSpeed: its ``save_checkpoint`` files (ZeRO partitions per rank); + scheduler.pt
    rng-rank{r}.pt              rank r's python / numpy / torch / cuda RNG states
    trainer_state.json          step, epoch, data position (next micro-batch index in that epoch's plan), ...
    train_config.json           the resolved configuration of the run that wrote it
    COMPLETE                    {"step": N, "files": {name: size}}: written LAST, by rank 0, after a barrier

Contract:
- a folder without ``COMPLETE`` is incomplete: it is never loaded and is deleted by the next save or resume;
- retention (``--save_total_limit``) deletes old checkpoints only after the new one's ``COMPLETE`` exists, so a
  kill at any moment leaves the previous complete checkpoint intact;
- loading checks every file's size against ``COMPLETE`` (a truncated file is a one-line CheckpointError naming
  it), and a shard index naming a file outside its folder is refused;
- the data position is an index into the epoch's micro-batch plan, which is deterministic from (seed, epoch):
  resuming recomputes the plan and skips the consumed micro-batches by index; no sample is read twice.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from easysft.distributed import all_reduce_max, barrier, print0
from easysft.errors import CheckpointError, NotAvailableYet

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CONFIG = "train_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30  # like transformers: keeps single files manageable on every file system
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Config keys that decide which samples each step sees or which weights exist: a resume that changes one of them
# is no longer the run it continues, so it is reported (the user may mean it, e.g. a smaller batch after an OOM).
_RESUME_KEYS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "data_path",
                "max_prompt_len", "max_ans_len", "template", "group_by_length", "packing", "packing_max_tokens",
                "model_name_or_path", "lora_dim", "lora_module_name")


@dataclass
class TrainerState:
    """Where the loop stands after optimizer step ``step``.

    ``next_micro_batch`` indexes epoch ``epoch``'s micro-batch plan; it may equal the plan's length (the epoch is
    finished, the resumed loop moves to the next epoch).
    """

    step: int
    epoch: int
    next_micro_batch: int
    nonfinite_in_a_row: int = 0
    reason: str = "save_steps"  # save_steps | preempted | nonfinite
    world_size: int = 1
    saved_at: float = field(default_factory=time.time)


@dataclass
class Resumed:
    """A loaded checkpoint: its state, and the run's curve so far (read back from metrics.jsonl)."""

    path: Path
    state: TrainerState
    losses: list[float]
    eval_history: list[dict]


# ---- layout ---------------------------------------------------------------------------------------------------


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every ``step-N`` folder, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child, is_complete(child)))
    return sorted(found, key=lambda item: item[0])


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint folder, marker FIRST: a kill part-way leaves an incomplete folder, never a broken
    'complete' one."""
    path = Path(path)
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(output_dir: str | Path) -> None:
    """Delete the leftovers of interrupted saves (rank 0 only; no save is in flight when it runs)."""
    for _step, path, complete in list_checkpoints(output_dir):
        if not complete:
            print0(f"removing incomplete checkpoint {path} (its save was interrupted)")
            remove_checkpoint(path)


def remove_all(output_dir: str | Path) -> None:
    """--overwrite_output_dir: the old run's checkpoints must not be resumed into the new run."""
    shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)


# ---- engine support ---------------------------------------------------------------------------------------------


def engine_can_checkpoint(engine) -> bool:
    return callable(getattr(engine, "save_checkpoint", None)) and callable(getattr(engine, "load_checkpoint", None))


def require_support(engine, train_cfg) -> None:
    """--save_steps/--resume with an engine that has no save_checkpoint/load_checkpoint: a clear error up front."""
    if (train_cfg.save_steps or train_cfg.resume) and not engine_can_checkpoint(engine):
        raise NotAvailableYet(
            f"checkpoints (--save_steps/--resume) are not available yet with the {engine.name!r} engine."
        )


# ---- save -------------------------------------------------------------------------------------------------------


def save(output_dir: str | Path, engine, state: TrainerState, run_config: dict, dist,
         save_total_limit: int | None = None) -> Path | None:
    """Write ``step-{state.step}`` atomically; a collective: EVERY rank calls it. Returns the folder (None when
    the engine cannot checkpoint). A step that already has a complete checkpoint is not written twice."""
    from easysft.train.faults import testing_hooks

    if not engine_can_checkpoint(engine):
        print0(f"the {engine.name!r} engine cannot write checkpoints; nothing saved at step {state.step}")
        return None
    path = step_dir(output_dir, state.step)
    # Rank 0 decides (max-reduce of its answer): every rank must take the same branch or a collective hangs.
    if all_reduce_max(float(is_complete(path)) if dist.is_main else 0.0) > 0:
        return path
    if dist.is_main:
        remove_incomplete(output_dir)
        path.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(path)  # weights + optimizer + scheduler (sharded engines: every rank writes its shard)
    save_torch_state(rng_state(), path / f"rng-rank{dist.rank}.pt")
    if dist.is_main:
        state.world_size = dist.world_size
        _write_json(path / TRAINER_STATE, asdict(state))
        _write_json(path / CONFIG, run_config)
    barrier()  # every rank's files are written before the marker says so
    hooks = testing_hooks()
    if hooks.pause_before_complete == state.step:
        _test_pause(f"easysft-test: paused before COMPLETE of step {state.step}\n")
    if dist.is_main:
        _write_json(path / COMPLETE, {"step": state.step, "files": _sync_and_sizes(path)})
        _fsync_dir(path)
        if save_total_limit:
            _apply_retention(output_dir, save_total_limit, keep=path)
    barrier()
    print0(f"saved checkpoint {path}")
    return path


def _apply_retention(output_dir: str | Path, limit: int, keep: Path) -> None:
    complete = [p for _, p, done in list_checkpoints(output_dir) if done]
    for old in complete[: max(len(complete) - limit, 0)]:
        if old != keep:
            remove_checkpoint(old)


def _sync_and_sizes(path: Path) -> dict[str, int]:
    """Flush every file to disk (so the marker never describes data still in the page cache) and list sizes."""
    sizes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        # Skip only our own atomic-write temporaries (".name.tmp"): DCP's ".metadata" is part of the checkpoint.
        if name == COMPLETE or (file.name.startswith(".") and file.name.endswith(".tmp")):
            continue
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sizes[name] = file.stat().st_size
    return sizes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause(message: str) -> None:
    """Testing hook: hold a save open (before its marker) so a test can kill the process mid-save."""
    os.write(2, message.encode())
    time.sleep(300)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, allow_nan=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ---- resume -----------------------------------------------------------------------------------------------------


def find_resume_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """``--resume``: 'latest' = the newest complete checkpoint in ``output_dir``; otherwise a checkpoint folder
    (or a run folder, meaning its newest complete checkpoint). Raises CheckpointError when there is none."""
    if resume == "latest":
        complete = [p for _, p, done in list_checkpoints(output_dir) if done]
        if not complete:
            raise CheckpointError(
                f"--resume: no complete checkpoint in {checkpoints_dir(output_dir)}; run without --resume to start "
                "a new run (add --save_steps N to write checkpoints)."
            )
        return complete[-1]
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder.")
    if not is_complete(path) and checkpoints_dir(path).is_dir():
        return find_resume_checkpoint("latest", path)
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {resume}: incomplete checkpoint (no {COMPLETE} marker: its save was interrupted); resume "
            "from an earlier one."
        )
    return path


def verify(path: str | Path) -> dict:
    """Read ``COMPLETE`` and check that every file it lists exists with its recorded size."""
    path = Path(path)
    try:
        marker = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
        files = dict(marker["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / COMPLETE}: unreadable completion marker ({exc}).") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing; resume from another checkpoint.")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {file} is {actual} bytes, expected {size} (truncated or modified); resume from "
                "another checkpoint."
            )
    return marker


def resume(path: str | Path, output_dir: str | Path, engine, dist, run_config: dict | None = None) -> Resumed:
    """Load checkpoint ``path`` into ``engine`` (weights, optimizer, scheduler), read its trainer state, clean
    interrupted saves and cut metrics.jsonl back to the checkpoint's step. RNG states are restored separately
    (:func:`restore_rng`), right before the loop, so that nothing in between consumes random numbers."""
    path = Path(path)
    verify(path)
    try:
        state = TrainerState(**json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path / TRAINER_STATE}: unreadable trainer state ({exc}).") from None
    if run_config is not None:
        _report_config_changes(path, run_config)
    engine.load_checkpoint(path)
    if dist.is_main:
        remove_incomplete(output_dir)
    losses, eval_history = rewind_metrics(output_dir, state.step, dist)
    print0(f"resumed from {path} (step {state.step}, epoch {state.epoch}, micro-batch {state.next_micro_batch})")
    return Resumed(path=path, state=state, losses=losses, eval_history=eval_history)


def _report_config_changes(path: Path, run_config: dict) -> None:
    try:
        saved = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for key in _RESUME_KEYS:
        if key in saved and key in run_config and saved[key] != run_config[key]:
            print0(f"warning: resuming with {key}={run_config[key]!r} but the checkpoint was written with "
                   f"{saved[key]!r}; the run will not match an uninterrupted one.")


def rewind_metrics(output_dir: str | Path, step: int, dist) -> tuple[list[float], list[dict]]:
    """Drop metrics.jsonl records after ``step`` (rank 0), so the resumed curve continues the saved one; return
    (per-step losses, eval records) up to ``step``. A torn last line (a kill mid-write) is dropped too."""
    path = Path(output_dir) / "metrics.jsonl"
    if dist.is_main and path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, path)
    barrier()
    if not path.is_file():
        return [], []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    return losses, [r for r in records if "eval_loss" in r]


# ---- RNG --------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states as plain containers and tensors (loadable with ``weights_only=True``)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different GPU count: restore this process's device only
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


def restore_rng(path: str | Path, dist) -> None:
    """Restore this rank's RNG states from checkpoint ``path`` (rank 0's when the world size changed)."""
    path = Path(path)
    file = path / f"rng-rank{dist.rank}.pt"
    if not file.is_file():
        file = path / "rng-rank0.pt"
    set_rng_state(load_torch_state(file))


# ---- tensor files (also used by the engines) -----------------------------------------------------------------------


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
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for a damaged file; all mean "corrupted"
        raise CheckpointError(f"checkpoint file {path} is corrupted or not a weights-only file: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


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
    _write_json(folder / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


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
