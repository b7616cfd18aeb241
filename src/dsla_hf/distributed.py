"""The process group of a multi-process run (`accelerate launch`, `torchrun`), for code that must agree across
processes: averaged losses and perplexities, one writer of files, barriers. Single-process runs see no group."""

from __future__ import annotations


def process_group():
    """`torch.distributed` when a group of more than one process is initialised, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def is_main_process() -> bool:
    dist = process_group()
    return dist is None or dist.get_rank() == 0


def barrier() -> None:
    dist = process_group()
    if dist is not None:
        dist.barrier()


__all__ = ["barrier", "is_main_process", "process_group"]
