"""Start torch.distributed for the multi-process engines (DDP, FSDP2, DeepSpeed), launched or not.

Under ``torchrun`` / ``deepspeed`` the launcher's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) say how
to meet the other ranks: :func:`easysft.distributed.init_process_group` uses them. Without a launcher, an explicit
``--engine ddp|fsdp|deepspeed`` still works: it gets a one-process group on a free localhost port, so the same
code path runs (useful to try an engine on one device). ``--engine auto`` never does this: without a launcher it
picks the single engine and nothing distributed is initialised.
"""

from __future__ import annotations

import socket

import torch

from easysft.distributed import DistInfo, init_process_group


def free_port() -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick; fine for a one-process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_process_group(dist_info: DistInfo) -> None:
    """Initialise the default process group once: gloo on CPU, nccl on CUDA (no-op when already up)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    if dist_info.is_distributed:
        init_process_group(dist_info)
        return
    backend = "nccl" if dist_info.device.type == "cuda" else "gloo"
    if dist_info.device.type == "cuda":
        torch.cuda.set_device(dist_info.device)
    tdist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
