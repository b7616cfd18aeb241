"""Rebuild DSLA states from cached keys and values: S = sum_i (prod_{j>i} a_j) k_i^T v_i."""

from __future__ import annotations

import torch

from .chunk import chunk_dsla


def fold_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    g1: torch.Tensor,
    g2: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
) -> torch.Tensor:
    """Final states [N, S, HK, K, V] (fp32) after reading ``k``/``v`` [B, T, HK, *] from ``initial_state``."""
    q = k.new_zeros(k.shape)  # one query per key head: the output is discarded
    _, state = chunk_dsla(q, k, v, g1, g2, None, None, initial_state, True, cu_seqlens)
    return state
