"""Naive fp32 token-by-token DSLA recurrence: the ground truth every other kernel is tested against.

Shapes follow flash-linear-attention (time-major):

    q  [B, T, H,  K]     queries (already through the query feature map, if any)
    k  [B, T, HK, K]     keys (already through the key feature map, if any)
    v  [B, T, HK, V]     values
    g1 [B, T, HK, K]     log decay of the history state (<= 0)
    g2 [B, T, HK, K]     log decay of the recency state (<= 0), or None for a single-state (GLA) layer
    mix                  mixing weights of the states: None (all ones), [S] or [H, S]
    initial_state        fp32 [N, S, HK, K, V] with S = 2 (or 1 when g2 is None)

Query head ``h`` reads the states of key/value head ``h // (H // HK)`` (the grouping of ``repeat_kv``).
With ``cu_seqlens`` (B must be 1) the batch is packed: sequence ``n`` spans ``cu_seqlens[n]:cu_seqlens[n+1]``.

    S_s,t = diag(exp(g_s,t)) S_s,t-1 + k_t^T v_t
    o_t   = scale * q_t (sum_s mix_s S_s,t)
"""

from __future__ import annotations

import torch

from .dispatch import fp32_compute


def _mix_weights(mix: torch.Tensor | None, num_heads: int, num_states: int, device) -> torch.Tensor:
    """Mixing weights as an fp32 [H, S] tensor."""
    if mix is None:
        return torch.ones(num_heads, num_states, device=device)
    mix = mix.float()
    if mix.dim() == 1:
        mix = mix.expand(num_heads, num_states)
    return mix


@fp32_compute
def naive_dsla(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    HK, V = k.shape[2], v.shape[-1]
    if H % HK:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HK})")
    G = H // HK
    scale = K**-0.5 if scale is None else scale
    gates = [g1] if g2 is None else [g1, g2]
    S = len(gates)
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError("cu_seqlens requires a batch of size 1 (packed sequences)")
        bounds = [(0, int(cu_seqlens[n]), int(cu_seqlens[n + 1])) for n in range(len(cu_seqlens) - 1)]
    w = _mix_weights(mix, H, S, q.device).view(HK, G, S)
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is not None:
            state = initial_state[n].float().clone()
        else:
            state = q.new_zeros(S, HK, K, V, dtype=torch.float32)
        for t in range(start, end):
            kv = k[b, t].float()[:, :, None] * v[b, t].float()[:, None, :]  # [HK, K, V]
            decay = torch.stack([g[b, t].float().exp() for g in gates])  # [S, HK, K]
            state = decay[..., None] * state + kv
            qt = q[b, t].float().view(HK, G, K) * scale
            # o[h] = q[h] @ sum_s w[h, s] S_s[group(h)]
            out = torch.einsum("agk,sakv,ags->agv", qt, state, w)
            o[b, t] = out.reshape(H, V)
        finals.append(state)
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final_state
