"""Resumable checkpoints, in three small modules (read them in this order):

- :mod:`~easysft.checkpoint.layout`: where checkpoints live (``output_dir/checkpoints/step-N/``), listing, removal;
- :mod:`~easysft.checkpoint.tensors` and :mod:`~easysft.checkpoint.rng`: the files inside one (weights, optimizer
  and scheduler states, RNG states);
- :mod:`~easysft.checkpoint.protocol`: the save/resume protocol (atomic through the ``COMPLETE`` marker, retention,
  verification, the trainer state).

``from easysft import checkpoint`` gives the names below; the engines write their part through ``tensors``.
"""

from easysft.checkpoint.layout import (
    COMPLETE,
    CONFIG,
    TRAINER_STATE,
    WEIGHTS,
    WEIGHTS_INDEX,
    checkpoints_dir,
    is_complete,
    list_checkpoints,
    remove_all,
    remove_checkpoint,
    remove_incomplete,
    step_dir,
)
from easysft.checkpoint.protocol import Resumed, TrainerState, find_resume_checkpoint, resume, save, verify
from easysft.checkpoint.rng import restore_rng, rng_state, set_rng_state
from easysft.checkpoint.tensors import (
    MAX_SHARD_BYTES,
    load_tensors,
    load_torch_state,
    load_trainable,
    save_tensors,
    save_torch_state,
    trainable_state,
)

__all__ = [
    "COMPLETE", "CONFIG", "MAX_SHARD_BYTES", "TRAINER_STATE", "WEIGHTS", "WEIGHTS_INDEX", "Resumed", "TrainerState",
    "checkpoints_dir", "find_resume_checkpoint", "is_complete", "list_checkpoints", "load_tensors",
    "load_torch_state", "load_trainable", "remove_all", "remove_checkpoint", "remove_incomplete", "restore_rng",
    "resume", "rng_state", "save", "save_tensors", "save_torch_state", "set_rng_state", "step_dir",
    "trainable_state", "verify",
]
