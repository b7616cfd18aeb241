"""Triton fused recurrent DSLA step for decoding on CUDA: both states of a KV head updated together, in place.

Shipped in saved folders' remote code too (imported lazily, only where Triton is importable).
Interpreter-safe (``TRITON_INTERPRET=1``). One program per (sequence, KV head, block of V columns)
loads both states once, applies the few new tokens, writes the outputs of the G query heads of the group, and
stores the states back (into ``initial_state`` itself when ``inplace``). Forward only: training uses the chunked
form.
"""

from __future__ import annotations

import torch

try:  # Transformers' remote-code check skips try blocks: a saved folder loads where Triton is not installed
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("The DSLA Triton kernels need Triton: pip install triton") from error
from .inputs import DSLAInputs
from .triton_chunk import _initial_states, _next_pow2, _starts, _state_tile


@triton.jit
def _recurrent_kernel(
    q, k, v, g1, g2, w, h0, ht, o, starts,
    scale,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, TWO: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
):  # fmt: skip
    i_v, i_n, i_h, bos, eos, o_k, o_v, m_k, m_v = _state_tile(starts, HK, K, V, BK, BV)
    S: tl.constexpr = 2 if TWO else 1
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = ((i_n * S) * HK + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    s1, s2 = _initial_states(h0, p_state, m_kv, HK, K, V, BK, BV, USE_H0, TWO)
    for t in range(bos, eos):
        kt = tl.load(k + (t * HK + i_h) * K + o_k, mask=m_k, other=0.0)
        vt = tl.load(v + (t * HK + i_h) * V + o_v, mask=m_v, other=0.0)
        kv = kt[:, None] * vt[None, :]
        s1 = s1 * tl.exp(tl.load(g1 + (t * HK + i_h) * K + o_k, mask=m_k, other=0.0))[:, None] + kv
        if TWO:
            s2 = s2 * tl.exp(tl.load(g2 + (t * HK + i_h) * K + o_k, mask=m_k, other=0.0))[:, None] + kv
        for gi in range(G):
            h = i_h * G + gi
            qt = tl.load(q + (t * H + h) * K + o_k, mask=m_k, other=0.0) * scale
            ot = tl.sum(qt[:, None] * s1, axis=0) * tl.load(w + h * S)
            if TWO:
                ot += tl.sum(qt[:, None] * s2, axis=0) * tl.load(w + h * S + 1)
            tl.store(o + (t * H + h) * V + o_v, ot, mask=m_v)
    if STORE_HT:
        tl.store(ht + p_state, s1, mask=m_kv)
        if TWO:
            tl.store(ht + p_state + HK * K * V, s2, mask=m_kv)


def fused_recurrent_dsla_triton(x: DSLAInputs, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton step of ``fused_recurrent_dsla``; differentiable steps (not in place) take the PyTorch path."""
    if x.needs_grad and not inplace:
        from .fused_recurrent import fused_recurrent_dsla_torch

        return fused_recurrent_dsla_torch(x, inplace=inplace)
    B, T, H, HK, K, V, S, N = x.B, x.T, x.H, x.HK, x.K, x.V, x.S, x.N
    starts = _starts(x)
    w = x.mix.contiguous()
    q_ = x.q.float().reshape(B * T, H, K).contiguous()
    k_ = x.k.float().reshape(B * T, HK, K).contiguous()
    v_ = x.v.float().reshape(B * T, HK, V).contiguous()
    g = [x.g[:, :, s].float().reshape(B * T, HK, K).contiguous() for s in range(S)]  # a pointer per state
    g1_, g2_ = g[0], g[-1]
    initial_state = x.initial_state
    if inplace:
        if initial_state is None:
            initial_state = torch.zeros(N, S, HK, K, V, device=x.device)
        if initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError("inplace=True needs a contiguous fp32 initial_state")
        ht = initial_state
    else:
        ht = torch.empty(N, S, HK, K, V, device=x.device) if x.output_final_state else k_
    h0 = initial_state.float().contiguous() if initial_state is not None else k_
    o = torch.empty(B * T, H, V, device=x.device, dtype=torch.float32)
    BK, BV = _next_pow2(K), min(64, _next_pow2(V))
    grid = (triton.cdiv(V, BV), N * HK)
    _recurrent_kernel[grid](
        q_, k_, v_, g1_, g2_, w, h0, ht, o, starts, x.scale,
        H=H, HK=HK, G=x.G, K=K, V=V, BK=BK, BV=BV, TWO=S == 2, USE_H0=initial_state is not None,
        STORE_HT=inplace or x.output_final_state,
    )  # fmt: skip
    o = o.view(B, T, H, V).to(x.q.dtype)
    if inplace:
        return o, initial_state
    return o, (ht if x.output_final_state else None)
