"""One object for distributed state (rank, world size, device) and the few collectives the loop needs.

The code runs without any launcher: then ``world_size == 1`` and nothing distributed is initialised. Under
``torchrun`` or ``deepspeed`` the launcher's environment variables (RANK, WORLD_SIZE, LOCAL_RANK) say so; the
process group is initialised by the engine (gloo on CPU, nccl on CUDA) via :func:`init_process_group`, the
one place easysft starts torch.distributed.
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


def free_port() -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick; fine for a one-process group)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process_group(dist_info: DistInfo, timeout_s: int = 600, *, single_process: bool = False) -> None:
    """Initialise the default process group once (gloo on CPU, nccl on CUDA); no-op when already up.

    Under ``torchrun`` / ``deepspeed`` the launcher's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) say
    how to meet the other ranks. Without a launcher nothing is initialised, unless ``single_process`` asks for a
    one-process group on a free localhost port: an explicit ``--engine ddp|fsdp|deepspeed`` then runs the same
    code path on one device. ``--engine auto`` never asks: without a launcher it picks the single engine.
    """
    import datetime

    import torch.distributed as tdist

    if tdist.is_initialized() or not (dist_info.is_distributed or single_process):
        return
    backend = "nccl" if dist_info.device.type == "cuda" else "gloo"
    if dist_info.device.type == "cuda":
        torch.cuda.set_device(dist_info.device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist_info.is_distributed:
        tdist.init_process_group(backend=backend, timeout=timeout)
    else:
        tdist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                 world_size=1, timeout=timeout)


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
