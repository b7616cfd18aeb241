"""Chunked DSLA (placeholder: the naive recurrence; the fast chunked path replaces it)."""

from __future__ import annotations

import torch

from .naive import naive_dsla


def chunk_dsla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g1: torch.Tensor,
    g2: torch.Tensor | None = None,
    mix: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return naive_dsla(q, k, v, g1, g2, mix, scale, initial_state, output_final_state, cu_seqlens)
