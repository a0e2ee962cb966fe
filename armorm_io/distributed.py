"""Data parallelism on an existing engine: the process group that `torchrun` / `accelerate launch` describe.

`armorm extract` and `armorm evaluate` call `init_distributed` first; each rank then works on its own share and rank 0
writes what is written once.
"""

import os

import torch
import torch.distributed as dist

from modeling_armorm.settings import resolve_device


__all__ = ["init_distributed"]


def init_distributed(device: str | None) -> tuple[int, int, bool, torch.device]:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and world_size > 1:  # under torchrun, "cuda" is this rank's GPU
        device = f"cuda:{local_rank}"
    device = resolve_device(device, local_rank)
    created = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world_size, created, device
