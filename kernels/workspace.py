"""Reusable scratch tensors for CPU inference.

A long prompt's intermediates are large (38 MiB per DSLA layer for the states' output at 16k tokens): above glibc's
mmap threshold (32 MiB at most) every allocation is fresh pages, and their faults cost about a tenth of a DSLA
layer's prefill on a VM. A tensor that dies within the call that asked for it (the states' output, read by the
window and then dropped) can instead come from here, kept per thread and name between calls (and between layers)
up to :data:`KEEP_BYTES`; larger ones are allocated each time and not kept.
"""

from __future__ import annotations

import threading

import torch

KEEP_BYTES = 256 << 20  # per thread: a 16k-token prompt of SmolLM2 needs 38 MiB, 8 x 4k rows twice that
_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:  # fmt: skip
    """An uninitialised tensor of `shape` on the CPU, the same memory for every call with the same `name` (on this
    thread) while it fits: the caller must be done with it before asking for `name` again. Other devices' caching
    allocators already reuse memory: a fresh tensor there."""
    numel = 1
    for n in shape:
        numel *= n
    device = torch.device(device)
    if device.type != "cpu" or numel * dtype.itemsize > KEEP_BYTES:
        return torch.empty(shape, device=device, dtype=dtype)
    kept = getattr(_local, "tensors", None)
    if kept is None:
        kept = _local.tensors = {}
    buffer = kept.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = kept[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)
