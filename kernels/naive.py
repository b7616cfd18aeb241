"""Naive fp32 token-by-token DSLA recurrence: the ground truth every other kernel is tested against.

    S_s,t = diag(exp(g_s,t)) S_s,t-1 + k_t^T v_t
    o_t   = scale * q_t (sum_s mix_s S_s,t)

(shapes and packing: :mod:`.inputs`).
"""

from __future__ import annotations

import torch

from .dispatch import fp32_compute
from .features import HedgehogFeatures
from .gates import LinearGates
from .inputs import DSLAInputs, check_inputs


def naive_dsla(
    q: torch.Tensor | HedgehogFeatures,
    k: torch.Tensor | HedgehogFeatures,
    v: torch.Tensor,
    g: torch.Tensor | LinearGates,
    mix: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dual-state linear attention token by token in fp32: the reference of every backend (slow; differentiable).

    Args:
        q: [B, T, H, K] queries (after the query feature map), or :class:`~.features.HedgehogFeatures`.
        k: [B, T, HK, K] keys (after the key feature map), or :class:`~.features.HedgehogFeatures`. ``H`` must be a
            multiple of ``HK``: query head ``h`` reads the states of key/value head ``h // (H // HK)``.
        v: [B, T, HK, V] values.
        g: [B, T, S, HK, K] log decays (<= 0) of each state, ``S = 2`` (DSLA's history and recency states) or 1 (a
            single-state, GLA layer); or :class:`~.gates.LinearGates` giving them by their inputs and weights.
        mix: mixing weights of the states, [S] (shared by the heads) or [H, S]; None: ones.
        scale: factor of the queries; None: ``K ** -0.5``.
        initial_state: fp32 [N, S, HK, K, V] states before the first token of each sequence; None: zeros.
        output_final_state: return the states after the last token.
        cu_seqlens: [N + 1] boundaries of packed sequences (``B`` must be 1): sequence ``n`` is tokens
            ``cu_seqlens[n]:cu_seqlens[n + 1]``, read from ``initial_state[n]``; tokens outside every sequence get
            zero outputs. None: each batch row is a sequence (``N = B``).

    Returns:
        o: [B, T, H, V] outputs, in the dtype of ``q``.
        final_state: fp32 [N, S, HK, K, V] states after the last token, or None without ``output_final_state``.
    """
    x = check_inputs(q, k, v, g, mix, scale, initial_state, output_final_state, cu_seqlens)
    return naive_forward(x.materialized())


@fp32_compute
def naive_forward(x: DSLAInputs, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence on checked inputs of tensors (the "naive" backend of ``chunk_dsla``, whose ``chunk_size`` the
    recurrence has no use for)."""
    q, k, v, g = x.q, x.k, x.v, x.g
    B, T, H, HK, K, V, S, G = x.B, x.T, x.H, x.HK, x.K, x.V, x.S, x.G
    if x.cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = x.cu_seqlens
        bounds = [(0, int(cu[n]), int(cu[n + 1])) for n in range(x.N)]
    w = x.mix.view(HK, G, S)
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if x.initial_state is not None:
            state = x.initial_state[n].float().clone()
        else:
            state = v.new_zeros(S, HK, K, V, dtype=torch.float32)
        for t in range(start, end):
            kv = k[b, t].float()[:, :, None] * v[b, t].float()[:, None, :]  # [HK, K, V]
            decay = g[b, t].float().exp()  # [S, HK, K]
            state = decay[..., None] * state + kv
            qt = q[b, t].float().view(HK, G, K) * x.scale
            # o[h] = q[h] @ sum_s w[h, s] S_s[group(h)]
            out = torch.einsum("agk,sakv,ags->agv", qt, state, w)
            o[b, t] = out.reshape(H, V)
        finals.append(state)
    final_state = torch.stack(finals) if x.output_final_state else None
    return o.to(q.dtype), final_state
