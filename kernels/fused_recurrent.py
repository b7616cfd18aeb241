"""Fused recurrent DSLA for decoding (placeholder: the naive recurrence)."""

from __future__ import annotations

import torch

from .naive import naive_dsla


def fused_recurrent_dsla(
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
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    o, final = naive_dsla(q, k, v, g1, g2, mix, scale, initial_state, output_final_state or inplace, cu_seqlens)
    if inplace and initial_state is not None:
        initial_state.copy_(final)
        final = initial_state
    return o, final
