"""Fused recurrent DSLA for decoding: one or a few tokens per step, both states updated together.

The PyTorch path keeps the per-step work to a handful of small batched ops on ``[B, S, HK, K, V]`` states, so a
step costs the same at any context length. With ``inplace=True`` the caller's ``initial_state`` (fp32) is updated
in place and returned as the final state (decoding, no autograd); otherwise the step is differentiable.
"""

from __future__ import annotations

import torch

from .dispatch import fp32_compute, resolve_backend
from .gates import LinearGates, gate_tensors
from .naive import naive_dsla


def _weights(mix, H, HK, S, scale, device) -> torch.Tensor:
    """Mixing weights with the scale folded in, as [S, HK, G, 1]."""
    if mix is None:
        w = torch.full((H, S), scale, device=device)
    else:
        w = mix.float()
        w = (w.expand(H, S) if w.dim() == 1 else w) * scale
    return w.t().reshape(S, HK, H // HK, 1)


def _recurrent(q, k, v, g1, g2, w, state, inplace):
    """q [B,T,H,K], k [B,T,HK,K], v [B,T,HK,V], state fp32 [B,S,HK,K,V]. Returns (o fp32 [B,T,H,V], state)."""
    B, T, H, K = q.shape
    HK = k.shape[2]
    G = H // HK
    g = g1.float().unsqueeze(2) if g2 is None else torch.stack([g1.float(), g2.float()], dim=2)  # [B,T,S,HK,K]
    decay = g.exp().unsqueeze(-1)
    kv = k.float().unsqueeze(-1) * v.float().unsqueeze(-2)  # [B,T,HK,K,V]
    qw = q.float().view(B, T, 1, HK, G, K) * w  # [B,T,S,HK,G,K]
    outs = []
    for t in range(T):
        if inplace:
            state.mul_(decay[:, t]).add_(kv[:, t].unsqueeze(1))
        else:
            state = torch.addcmul(kv[:, t].unsqueeze(1), decay[:, t], state)
        outs.append((qw[:, t] @ state).sum(1))  # [B,HK,G,V]
    o = torch.stack(outs, dim=1).reshape(B, T, H, -1)
    return o, state


@fp32_compute
def fused_recurrent_dsla_torch(
    q, k, v, g1, g2=None, mix=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    inplace=False,
):  # fmt: skip
    B, T, H, K = q.shape
    HK, V = k.shape[2], v.shape[-1]
    if H % HK:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HK})")
    S = 1 if g2 is None else 2
    scale = K**-0.5 if scale is None else scale
    w = _weights(mix, H, HK, S, scale, q.device)
    if inplace and initial_state is not None and initial_state.dtype != torch.float32:
        raise ValueError("inplace=True needs an fp32 initial_state")
    if cu_seqlens is None:
        sequences = [(slice(None), slice(None), slice(0, B))]
        N = B
    else:
        if B != 1:
            raise ValueError("cu_seqlens requires a batch of size 1 (packed sequences)")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        N = len(bounds) - 1
        sequences = [(slice(None), slice(bounds[n], bounds[n + 1]), slice(n, n + 1)) for n in range(N)]
    if initial_state is None:
        initial_state = q.new_zeros(N, S, HK, K, V, dtype=torch.float32)
    elif not inplace:
        initial_state = initial_state.float()
    outs, finals = [], []
    for rows, span, seq in sequences:
        state = initial_state[seq]
        o, state = _recurrent(q[rows, span], k[rows, span], v[rows, span], g1[rows, span],
                              None if g2 is None else g2[rows, span], w, state, inplace)  # fmt: skip
        outs.append(o)
        finals.append(state)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if inplace:
        return o.to(q.dtype), initial_state
    final = finals[0] if len(finals) == 1 else torch.cat(finals)
    return o.to(q.dtype), (final if output_final_state else None)


def fused_recurrent_dsla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g1: torch.Tensor | LinearGates,
    g2: torch.Tensor | None = None,
    mix: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent DSLA for a few tokens per sequence (decoding). Shapes: see :mod:`naive`.

    ``inplace=True`` updates ``initial_state`` (fp32 ``[N, S, HK, K, V]``) in place and returns it as the final
    state. ``backend``: ``None`` (Triton for CUDA tensors when importable, else PyTorch), ``"torch"``,
    ``"triton"`` or ``"naive"``. ``g1`` may be a :class:`~.gates.LinearGates` (with ``g2=None``).
    """
    g1, g2 = gate_tensors(g1, g2)
    backend = resolve_backend(q, backend)
    if backend == "naive":
        o, final = naive_dsla(q, k, v, g1, g2, mix, scale, initial_state, output_final_state or inplace, cu_seqlens)
        if inplace:
            if initial_state is None:
                return o, final
            initial_state.copy_(final)
            final = initial_state
        return o, final
    if backend == "triton":
        from .triton_recurrent import fused_recurrent_dsla_triton

        return fused_recurrent_dsla_triton(
            q, k, v, g1, g2, mix, scale, initial_state, output_final_state, cu_seqlens, inplace=inplace
        )
    return fused_recurrent_dsla_torch(
        q, k, v, g1, g2, mix, scale, initial_state, output_final_state, cu_seqlens, inplace
    )
