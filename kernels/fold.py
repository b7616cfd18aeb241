"""Rebuild DSLA states from cached keys and values: S = sum_i (prod_{j>i} a_j) k_i^T v_i.

This is the chunk kernel with only the final states as output: per-chunk states by batched matmuls and the scan
over chunks, no queries and no attention matrix.
"""

from __future__ import annotations

import torch

from .chunk import chunk_states_torch
from .dispatch import resolve_backend
from .gates import LinearGates, gate_tensors
from .naive import naive_dsla


def fold_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    g1: torch.Tensor | LinearGates,
    g2: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
) -> torch.Tensor:
    """Final states [N, S, HK, K, V] (fp32) after reading ``k``/``v`` [B, T, HK, *] from ``initial_state``.
    ``g1`` may be a :class:`~.gates.LinearGates` (with ``g2=None``)."""
    g1, g2 = gate_tensors(g1, g2)
    backend = resolve_backend(k, backend)
    if backend == "naive":
        q = k.new_zeros(k.shape)
        return naive_dsla(q, k, v, g1, g2, None, None, initial_state, True, cu_seqlens)[1]
    if backend == "triton":
        from .triton_chunk import fold_kv_triton

        return fold_kv_triton(k, v, g1, g2, initial_state, cu_seqlens, chunk_size=chunk_size)
    return chunk_states_torch(k, v, g1, g2, initial_state, cu_seqlens, chunk_size)
