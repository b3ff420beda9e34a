"""Every rank's random-number generator states (python, numpy, torch, cuda) in a checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from easysft.checkpoint.tensors import load_torch_state


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

