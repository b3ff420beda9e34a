"""Where checkpoints live: ``output_dir/checkpoints/step-N/``, and how they are listed and removed.

A folder counts as a checkpoint only once its ``COMPLETE`` marker exists (see :mod:`easysft.checkpoint.protocol`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from easysft.distributed import print0

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CONFIG = "train_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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

