"""One object for distributed state (rank, world size, device) and the few collectives the loop needs.

The code runs without any launcher: then ``world_size == 1`` and nothing distributed is initialised. Under
``torchrun`` or ``deepspeed`` the launcher's environment variables (RANK, WORLD_SIZE, LOCAL_RANK) say so; the
process group is initialised by the engine (gloo on CPU, nccl on CUDA) via :func:`init_process_group`.
Rank-0-only side effects (printing, writing files) are explicit: ``if dist.is_main: ...``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read the launcher's variables; pick ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        else:
            device = torch.device("cpu")
        return cls(rank=rank, world_size=world, local_rank=local, device=device)


def init_process_group(dist_info: DistInfo, timeout_s: int = 600) -> None:
    """Initialise torch.distributed once (no-op for a single process or when already initialised)."""
    import datetime

    import torch.distributed as tdist

    if not dist_info.is_distributed or tdist.is_initialized():
        return
    backend = "nccl" if dist_info.device.type == "cuda" else "gloo"
    if dist_info.device.type == "cuda":
        torch.cuda.set_device(dist_info.device)
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def _initialised() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def all_reduce_sum(value: float | int | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum a number (or tensor) over ranks; returns a float64 tensor (exact for token counts up to 2**53)."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device or "cpu").clone()
    if _initialised():
        import torch.distributed as tdist

        if tensor.device.type == "cpu" and tdist.get_backend() == "nccl":
            tensor = tensor.cuda()
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor.cpu()


def all_reduce_max(value: float) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if _initialised():
        import torch.distributed as tdist

        if tdist.get_backend() == "nccl":
            tensor = tensor.cuda()
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return float(tensor.item())


def barrier() -> None:
    if _initialised():
        import torch.distributed as tdist

        tdist.barrier()


def print0(*args, dist_info: DistInfo | None = None, file=None, **kwargs) -> None:
    """Print on rank 0 only (to stderr by default: stdout is kept for machine-readable results)."""
    rank = dist_info.rank if dist_info is not None else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(*args, file=file or sys.stderr, flush=True, **kwargs)
