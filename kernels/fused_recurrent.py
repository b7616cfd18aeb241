"""Fused recurrent DSLA for decoding: one or a few tokens per step, both states updated together.

The PyTorch path keeps the per-step work to a handful of small batched ops on ``[B, S, HK, K, V]`` states, so a
step costs the same at any context length. With ``inplace=True`` the caller's ``initial_state`` (fp32) is updated
in place and returned as the final state (decoding, no autograd); otherwise the step is differentiable.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .dispatch import fp32_compute, implementation, resolve_backend
from .features import HedgehogFeatures
from .gates import LinearGates
from .inputs import DSLAInputs, check_inputs
from .naive import naive_forward


def _recurrent(q, k, v, g, w, state, inplace):
    """q [B,T,H,K], k [B,T,HK,K], v [B,T,HK,V], g [B,T,S,HK,K], w [S,HK,G,1], state fp32 [B,S,HK,K,V].
    Returns (o fp32 [B,T,H,V], state)."""
    B, T, H, K = q.shape
    HK = k.shape[2]
    G = H // HK
    # exp's last bits depend on the memory order (vector loop bodies, scalar tails): kept as it has always been, one
    # contiguous tensor for two states (they used to be stacked), the view as given for one
    decay = (g.float() if g.shape[2] == 1 else g.float().contiguous()).exp().unsqueeze(-1)
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
def fused_recurrent_dsla_torch(x: DSLAInputs, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch path of ``fused_recurrent_dsla``."""
    w = (x.mix * x.scale).t().reshape(x.S, x.HK, x.G, 1)  # the scale folded into the mixing weights
    if x.cu_seqlens is None:
        sequences = [(slice(None), slice(None), slice(0, x.B))]
    else:
        bounds = [int(t) for t in x.cu_seqlens.tolist()]
        sequences = [(slice(None), slice(bounds[n], bounds[n + 1]), slice(n, n + 1)) for n in range(x.N)]
    initial_state = x.initial_state
    if initial_state is None:
        initial_state = x.v.new_zeros(x.N, x.S, x.HK, x.K, x.V, dtype=torch.float32)
    elif not inplace:
        initial_state = initial_state.float()
    outs, finals = [], []
    for rows, span, seq in sequences:
        o, state = _recurrent(x.q[rows, span], x.k[rows, span], x.v[rows, span], x.g[rows, span], w,
                              initial_state[seq], inplace)  # fmt: skip
        outs.append(o)
        finals.append(state)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if inplace:
        return o.to(x.q.dtype), initial_state
    final = finals[0] if len(finals) == 1 else torch.cat(finals)
    return o.to(x.q.dtype), (final if x.output_final_state else None)


def fused_recurrent_naive(x: DSLAInputs, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive recurrence, with ``inplace`` as the other backends have it."""
    o, final = naive_forward(replace(x, output_final_state=x.output_final_state or inplace))
    if inplace and x.initial_state is not None:
        final = x.initial_state.copy_(final)
    return o, final


def fused_recurrent_dsla(
    q: torch.Tensor | HedgehogFeatures,
    k: torch.Tensor | HedgehogFeatures,
    v: torch.Tensor,
    g: torch.Tensor | LinearGates,
    mix: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent dual-state linear attention for a few tokens per sequence (decoding; the recurrence:
    :mod:`.inputs`).

    Args:
        q: [B, T, H, K] queries (after the query feature map), or :class:`~.features.HedgehogFeatures`.
        k: [B, T, HK, K] keys (after the key feature map), or :class:`~.features.HedgehogFeatures`. ``H`` must be a
            multiple of ``HK``: query head ``h`` reads the states of key/value head ``h // (H // HK)``.
        v: [B, T, HK, V] values.
        g: [B, T, S, HK, K] log decays (<= 0) of each state (``S`` = 2 or 1), or :class:`~.gates.LinearGates`.
        mix: mixing weights of the states, [S] (shared by the heads) or [H, S]; None: ones.
        scale: factor of the queries; None: ``K ** -0.5``.
        initial_state: fp32 [N, S, HK, K, V] states before the new tokens of each sequence; None: zeros.
        output_final_state: return the states after the last token.
        cu_seqlens: [N + 1] boundaries of packed sequences (``B`` must be 1), or None (``N = B``).
        inplace: update ``initial_state`` (fp32; contiguous for Triton) in place and return it as the final state
            (with no ``initial_state``, the final state starts from zeros and is returned).
        backend: None (Triton for CUDA tensors when importable, else PyTorch), ``"torch"``, ``"triton"`` or
            ``"naive"``.

    Returns:
        o: [B, T, H, V] outputs in the dtype of ``q``.
        final_state: fp32 [N, S, HK, K, V] states after the last token (``initial_state`` itself with ``inplace``),
            or None without ``output_final_state`` or ``inplace``.
    """
    x = check_inputs(q, k, v, g, mix, scale, initial_state, output_final_state, cu_seqlens)
    if inplace and initial_state is not None and initial_state.dtype != torch.float32:
        raise ValueError("inplace=True needs an fp32 initial_state")
    backend = resolve_backend("recurrent", x.v, backend)
    return implementation("recurrent", backend)(x.materialized(), inplace=inplace)
