"""Rebuild DSLA states from cached keys and values: S = sum_i (prod_{j>i} a_j) k_i^T v_i.

This is the chunk kernel with only the final states as output: per-chunk states by batched matmuls and the scan
over chunks, no queries and no attention matrix.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .dispatch import implementation, resolve_backend
from .features import HedgehogFeatures
from .gates import LinearGates
from .inputs import CHUNK, DSLAInputs, check_inputs
from .naive import naive_forward


def fold_kv_naive(x: DSLAInputs, chunk_size: int) -> torch.Tensor:
    """The naive recurrence's final states (zero queries: the outputs are not wanted; no chunks either)."""
    return naive_forward(replace(x, q=torch.zeros_like(x.k)))[1]


def fold_kv(
    k: torch.Tensor | HedgehogFeatures,
    v: torch.Tensor,
    g: torch.Tensor | LinearGates,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int = CHUNK,
    backend: str | None = None,
) -> torch.Tensor:
    """The states after reading keys and values, as :func:`~.chunk.chunk_dsla` would leave them (no queries).

    Args:
        k: [B, T, HK, K] keys (after the key feature map), or :class:`~.features.HedgehogFeatures`.
        v: [B, T, HK, V] values.
        g: [B, T, S, HK, K] log decays (<= 0) of each state (``S`` = 2 or 1), or :class:`~.gates.LinearGates`.
        initial_state: fp32 [N, S, HK, K, V] states before the first token of each sequence; None: zeros.
        cu_seqlens: [N + 1] boundaries of packed sequences (``B`` must be 1), or None (``N = B``).
        chunk_size: tokens per chunk.
        backend: None (Triton for CUDA tensors when importable, else PyTorch), ``"torch"``, ``"triton"`` or
            ``"naive"``.

    Returns:
        fp32 [N, S, HK, K, V] states after the last token of each sequence.
    """
    x = check_inputs(None, k, v, g, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens)
    backend = resolve_backend("fold", x.v, backend)
    return implementation("fold", backend)(x.materialized(), chunk_size)
