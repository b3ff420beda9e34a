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
  resuming recomputes the plan and skips the consumed micro-batches by index; no sample is read twice."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from easysft.checkpoint.layout import (
    COMPLETE,
    CONFIG,
    TRAINER_STATE,
    checkpoints_dir,
    is_complete,
    list_checkpoints,
    remove_checkpoint,
    remove_incomplete,
    step_dir,
)
from easysft.checkpoint.rng import rng_state
from easysft.checkpoint.tensors import save_torch_state
from easysft.config import resume_sensitive_keys
from easysft.distributed import all_reduce_max, barrier, print0
from easysft.errors import CheckpointError, TrainingError
from easysft.files import disk_full_reason, fsync_dir, fsync_file, is_temporary, write_json_atomic
from easysft.metrics import rewind_metrics
from easysft.testing_hooks import TestingHooks, pause_for_test

# Run facts outside the config dataclasses that also decide which samples each step sees.
_RESUME_RUN_KEYS = ("world_size",)


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
    reason: str = "save_steps"  # save_steps | preempted | nonfinite | best | early_stopping
    world_size: int = 1
    saved_at: float = field(default_factory=time.time)


@dataclass
class Resumed:
    """A loaded checkpoint: its state, and the run's curve so far (read back from metrics.jsonl)."""

    path: Path
    state: TrainerState
    losses: list[float]
    eval_history: list[dict]


def save(output_dir: str | Path, engine, state: TrainerState, run_config: dict, dist,
         save_total_limit: int | None = None, hooks: TestingHooks | None = None, protect: Path | None = None) -> Path:
    """Write ``step-{state.step}`` atomically; a collective: EVERY rank calls it. Returns the folder. A step that
    already has a complete checkpoint is not written twice. ``hooks``: the testing hooks (pause before COMPLETE).
    ``protect``: a checkpoint retention never deletes (the best eval's, with --load_best_model_at_end)."""
    path = step_dir(output_dir, state.step)
    # Rank 0 decides (max-reduce of its answer): every rank must take the same branch or a collective hangs.
    if all_reduce_max(float(is_complete(path)) if dist.is_main else 0.0) > 0:
        return path
    if dist.is_main:
        remove_incomplete(output_dir)
    try:
        if dist.is_main:
            path.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(path)  # weights + optimizer + scheduler (sharded engines: every rank its shard)
        save_torch_state(rng_state(), path / f"rng-rank{dist.rank}.pt")
        if dist.is_main:
            state.world_size = dist.world_size
            write_json_atomic(path / TRAINER_STATE, asdict(state))
            write_json_atomic(path / CONFIG, run_config)
        barrier()  # every rank's files are written before the marker says so
        if hooks is not None and hooks.pause_before_complete == state.step:
            pause_for_test(f"easysft-test: paused before COMPLETE of step {state.step}\n")
        if dist.is_main:
            write_json_atomic(path / COMPLETE, {"step": state.step, "files": _sync_and_sizes(path)})
            fsync_dir(path)
    except Exception as exc:
        # A save that failed (a full disk, usually) must not leave its half folder taking the space; the previous
        # complete checkpoint is untouched. Rank 0 removes it (single process: nobody else writes into it).
        if dist.is_main and not is_complete(path) and dist.world_size == 1:
            remove_checkpoint(path)
        why = disk_full_reason(exc)
        if why is None:
            raise
        done = [p for _, p, complete in list_checkpoints(output_dir) if complete]
        kept = f"the last complete checkpoint {done[-1]} is kept" if done else "no complete checkpoint exists yet"
        raise TrainingError(f"cannot write checkpoint {path} ({why}); {kept}: free space, then rerun the same "
                            "command with --resume.") from None
    if dist.is_main:
        if save_total_limit:
            _apply_retention(output_dir, save_total_limit, keep=path, protect=protect)
    barrier()
    print0(f"saved checkpoint {path}")
    return path


def _apply_retention(output_dir: str | Path, limit: int, keep: Path, protect: Path | None = None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit``; never ``keep`` (the new one) nor ``protect``
    (the best one, which is then kept in addition to the ``limit`` newest)."""
    complete = [Path(p) for _, p, done in list_checkpoints(output_dir) if done]
    spared = set(complete[max(len(complete) - limit, 0):]) | {Path(keep)}
    if protect is not None:
        spared.add(Path(protect))
    for old in complete:
        if old not in spared:
            remove_checkpoint(old)


def _sync_and_sizes(path: Path) -> dict[str, int]:
    """Flush every file to disk (so the marker never describes data still in the page cache) and list sizes."""
    sizes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        # Skip only our own atomic-write temporaries (".name.tmp"): DCP's ".metadata" is part of the checkpoint.
        if name == COMPLETE or is_temporary(file.name):
            continue
        fsync_file(file)
        sizes[name] = file.stat().st_size
    return sizes


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
    for key in (*resume_sensitive_keys(), *_RESUME_RUN_KEYS):
        if key in saved and key in run_config and saved[key] != run_config[key]:
            print0(f"warning: resuming with {key}={run_config[key]!r} but the checkpoint was written with "
                   f"{saved[key]!r}; the run will not match an uninterrupted one.")

