"""Triton fused DSLA decoding step on CUDA (the math: ``decode.py``'s docstring): states and window updated in place.

Shipped in saved folders' remote code too (imported lazily, only where Triton is importable).
Interpreter-safe (``TRITON_INTERPRET=1``): no ``.to()`` on loop indices, no autotuning.

Two launches per step, so that the value columns of the states can be spread over many programs while the softmax
over the window still sees full-width dot products:

1. ``_decode_head_kernel``, one program per (sequence, KV head): the entering token's Hedgehog features and decays,
   the G query heads' features, the normaliser column (column D) of both states (updated in place and read), and the
   softmax over the moved window (read from the old one: keys 1..W-1 and the new key). It leaves small per-head
   factors in a scratch buffer: ``o = sum_j pw_j v_j + cl lin[:D]`` with ``pw = p / den`` and ``cl = c / den``
   (``cl = 1 / (lin[D] + 1e-6)`` with no window).
2. ``_decode_values_kernel``, one program per (sequence, KV head, block of ``BV`` value columns): those columns of
   both states updated in place and read by the G heads, the window's values weighed, the outputs written, and the
   window's keys and values moved by one token. The validity rows, shared by all KV heads of a sequence and read by
   every program of launch 1, are moved here by one program per sequence.

Each state element is read once and written once. Every program reads what it overwrites before a barrier and
writes it after, so that no thread (tiles may be replicated over warps) reads a value already overwritten.
"""

from __future__ import annotations

import torch

try:  # Transformers' remote-code check skips try blocks: a saved folder loads where Triton is not installed
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("The DSLA Triton kernels need Triton: pip install triton") from error
from .triton_chunk import _next_pow2


@triton.jit
def _hedgehog(x, m_ptr, o_f, o_d, D: tl.constexpr, F: tl.constexpr):
    """[softmax(x M), softmax(-x M)] for x [BD] (zero past D) and M [D, F] row-major: fp32 [BF2], zero past 2F.
    Row r < F is feature r of the positive half, row F + r feature r of the negative one (the states' layout)."""
    pos, live = o_f < F, o_f < 2 * F
    col = tl.where(pos, o_f, o_f - F)
    mt = tl.load(m_ptr + o_d[None, :] * F + col[:, None], mask=live[:, None] & (o_d < D)[None, :], other=0.0)
    z = tl.sum(mt.to(tl.float32) * x[None, :], axis=1)
    z = tl.where(pos, z, -z)
    # One softmax per half: its own maximum and sum, broadcast back to its rows.
    hi = tl.max(tl.where(pos, z, float("-inf")), 0)
    lo = tl.max(tl.where(live & ~pos, z, float("-inf")), 0)
    e = tl.where(live, tl.exp(z - tl.where(pos, hi, lo)), 0.0)
    return e / tl.where(pos, tl.sum(tl.where(pos, e, 0.0), 0), tl.sum(tl.where(pos, 0.0, e), 0))


@triton.jit
def _moved_rows(win, new, o_w, cols, m_cols, W: tl.constexpr, row_stride):
    """Entries 0..W-1 of the window after its move, columns ``cols``, in the window's dtype: old entry j + 1, and the
    new token (``new``, cast to the window's dtype as the reference's copy does) as the newest. ``win`` points at
    entry 0 of this sequence and head, entries ``row_stride`` apart."""
    old = tl.load(win + (o_w[:, None] + 1) * row_stride + cols[None, :], mask=(o_w < W - 1)[:, None] & m_cols[None, :],
                  other=0.0)  # fmt: skip
    row = tl.load(new + cols, mask=m_cols, other=0.0).to(win.dtype.element_ty)
    return tl.where((o_w == W - 1)[:, None], row[None, :], old)


# One program per (batch row, KV head) does a whole decode step of that head: features, gates, both state updates
# in place, the window's softmax terms and the shared normaliser. One launch per layer per token is the point of
# the fused step, so it stays one function.
@triton.jit
def _decode_head_kernel(
    q, k, state, q_map, k_map, gate_w, gate_b, mix_w, keys, valid, mask, pos, inv_freq, log_scale,
    phi_out, decay_out, psi_out, pw_out, cl_out,
    q_sb, k_sb, pos_sb, pos_st, inv_tau, clamp, rope_scale, qk_scale,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, F: tl.constexpr, S: tl.constexpr,
    W: tl.constexpr, BD: tl.constexpr, BF2: tl.constexpr, BW: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):  # fmt: skip
    i_nh = tl.program_id(0)
    i_b, i_h = i_nh // HK, i_nh % HK
    F2: tl.constexpr = 2 * F
    V1: tl.constexpr = D + 1
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF2)
    m_d, m_f = o_d < D, o_f < F2
    new_valid = 1.0
    if HAS_MASK:
        new_valid = tl.load(mask + i_b).to(tl.float32)
    # The entering token: the window's oldest entry (read before launch 2 moves the window), or the new one.
    if W > 0:
        k_in = tl.load(keys + (i_b * W * HK + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        m_in = tl.load(valid + i_b * W).to(tl.float32)
    else:
        k_in = tl.load(k + i_b * k_sb + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        m_in = new_valid
    phi = _hedgehog(k_in, k_map + i_h * D * F, o_f, o_d, D, F) * m_in
    tl.store(phi_out + i_nh * F2 + o_f, phi, mask=m_f)
    # Per state: decays e^{g m_in} (no decay where the entering token is padding) and the normaliser column,
    # S[:, D] = e^g S[:, D] + phi (the appended 1 of [v, 1]).
    cols = tl.zeros([BF2], dtype=tl.float32)
    cols2 = tl.zeros([BF2], dtype=tl.float32)
    decays = tl.zeros([BF2], dtype=tl.float32)
    decays2 = tl.zeros([BF2], dtype=tl.float32)
    p_col = state + ((i_b * S * HK + i_h) * F2 + o_f) * V1 + D
    for s in tl.static_range(S):
        gw = tl.load(gate_w + ((s * HK + i_h) * F2 + o_f[:, None]) * D + o_d[None, :],
                     mask=m_f[:, None] & m_d[None, :], other=0.0)  # fmt: skip
        u = tl.sum(gw.to(tl.float32) * k_in[None, :], axis=1)
        u += tl.load(gate_b + (s * HK + i_h) * F2 + o_f, mask=m_f, other=0.0).to(tl.float32)
        g = (tl.minimum(u, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(u)))) * inv_tau  # logsigmoid, overflow-free
        if HAS_CLAMP:
            g = tl.maximum(g, clamp)
        a = tl.exp(g * m_in)
        tl.store(decay_out + (i_nh * S + s) * F2 + o_f, a, mask=m_f)
        col = tl.load(p_col + s * HK * F2 * V1, mask=m_f, other=0.0)
        if s == 0:
            cols, decays = col, a
        else:
            cols2, decays2 = col, a
    tl.debug_barrier()  # the columns are read by every thread before any is overwritten
    cols = decays * cols + phi
    tl.store(p_col, cols, mask=m_f)
    if S == 2:
        cols2 = decays2 * cols2 + phi
        tl.store(p_col + HK * F2 * V1, cols2, mask=m_f)
    if W > 0:
        # The moved window's keys with RoPE (entry j at position pos[j + 1]), and which entries are live: the old
        # validity row's entry j + 1, or the new token's.
        o_w = tl.arange(0, BW)
        m_w = o_w < W
        half: tl.constexpr = D // 2
        partner = tl.where(o_d < half, o_d + half, o_d - half)  # rotate-half: x[d + D/2] negated, or x[d - D/2]
        sign = tl.where(o_d < half, -1.0, 1.0)
        freq = tl.load(inv_freq + o_d % half, mask=m_d, other=0.0).to(tl.float32)
        p_keys = keys + (i_b * W * HK + i_h) * D
        p_new = k + i_b * k_sb + i_h * D
        kx = _moved_rows(p_keys, p_new, o_w, o_d, m_d, W, HK * D).to(tl.float32)
        kp = _moved_rows(p_keys, p_new, o_w, partner, m_d, W, HK * D).to(tl.float32)
        angle = tl.load(pos + i_b * pos_sb + (o_w + 1) * pos_st, mask=m_w, other=0).to(tl.float32)[:, None] * freq
        k_rot = kx * (tl.cos(angle) * rope_scale) + sign * kp * (tl.sin(angle) * rope_scale)
        ok = tl.load(valid + i_b * W + o_w + 1, mask=o_w < W - 1, other=0.0).to(tl.float32)
        live = (tl.where(o_w == W - 1, new_valid, ok) > 0.0) & m_w
        q_angle = tl.load(pos + i_b * pos_sb + W * pos_st).to(tl.float32) * freq
        q_cos, q_sin = tl.cos(q_angle) * rope_scale, tl.sin(q_angle) * rope_scale
    for gi in range(G):
        h = i_h * G + gi
        p_q = q + i_b * q_sb + h * D
        qh = tl.load(p_q + o_d, mask=m_d, other=0.0).to(tl.float32)
        psi = _hedgehog(qh, q_map + h * D * F, o_f, o_d, D, F)
        tl.store(psi_out + (i_b * H + h) * F2 + o_f, psi, mask=m_f)
        lin_d = tl.load(mix_w + h * S) * tl.sum(psi * cols, 0)
        if S == 2:
            lin_d += tl.load(mix_w + h * S + 1) * tl.sum(psi * cols2, 0)
        if W > 0:
            qp = tl.load(p_q + partner, mask=m_d, other=0.0).to(tl.float32)
            q_rot = (qh * q_cos + sign * qp * q_sin) * qk_scale
            scores = tl.sum(k_rot * q_rot[None, :], axis=1)
            top = tl.max(tl.where(live, scores, 0.0), 0)  # m = max(0, max_j s_j)
            p = tl.where(live, tl.exp(scores - top), 0.0)
            c = tl.exp(tl.load(log_scale + h).to(tl.float32) - top)
            inv = 1.0 / (tl.sum(p, 0) + c * lin_d + 1e-6)
            tl.store(pw_out + (i_b * H + h) * W + o_w, p * inv, mask=m_w)
            tl.store(cl_out + i_b * H + h, c * inv)
        else:
            tl.store(cl_out + i_b * H + h, 1.0 / (lin_d + 1e-6))


@triton.jit
def _decode_values_kernel(
    v, state, mix_w, keys, values, valid, mask, k, o, phi_in, decay_in, psi_in, pw_in, cl_in,
    k_sb, v_sb,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, F: tl.constexpr, S: tl.constexpr,
    W: tl.constexpr, BV: tl.constexpr, BF2: tl.constexpr, BW: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_nh // HK, i_nh % HK
    F2: tl.constexpr = 2 * F
    V1: tl.constexpr = D + 1
    o_f, o_w = tl.arange(0, BF2), tl.arange(0, BW)
    cols = i_v * BV + tl.arange(0, BV)
    m_f, m_v, m_w = o_f < F2, cols < D, o_w < W
    m_fv = m_f[:, None] & m_v[None, :]
    # Everything this program overwrites is read first: the entering value, the state columns, the window.
    p_win = (i_b * W * HK + i_h) * D
    if W > 0:
        v_in = tl.load(values + p_win + cols, mask=m_v, other=0.0).to(tl.float32)
    else:
        v_in = tl.load(v + i_b * v_sb + i_h * D + cols, mask=m_v, other=0.0).to(tl.float32)
    p_state = state + ((i_b * S * HK + i_h) * F2 + o_f[:, None]) * V1 + cols[None, :]
    s1 = tl.load(p_state, mask=m_fv, other=0.0)
    s2 = s1
    if S == 2:
        s2 = tl.load(p_state + HK * F2 * V1, mask=m_fv, other=0.0)
    if W > 0:
        new_keys = _moved_rows(keys + p_win, k + i_b * k_sb + i_h * D, o_w, cols, m_v, W, HK * D)
        new_values = _moved_rows(values + p_win, v + i_b * v_sb + i_h * D, o_w, cols, m_v, W, HK * D)
    tl.debug_barrier()
    kv = tl.load(phi_in + i_nh * F2 + o_f, mask=m_f, other=0.0)[:, None] * v_in[None, :]
    s1 = tl.load(decay_in + i_nh * S * F2 + o_f, mask=m_f, other=0.0)[:, None] * s1 + kv
    tl.store(p_state, s1, mask=m_fv)
    if S == 2:
        s2 = tl.load(decay_in + (i_nh * S + 1) * F2 + o_f, mask=m_f, other=0.0)[:, None] * s2 + kv
        tl.store(p_state + HK * F2 * V1, s2, mask=m_fv)
    if W > 0:
        p_rows = p_win + o_w[:, None] * HK * D + cols[None, :]
        m_rows = m_w[:, None] & m_v[None, :]
        tl.store(keys + p_rows, new_keys, mask=m_rows)
        tl.store(values + p_rows, new_values, mask=m_rows)
        new_values = new_values.to(tl.float32)
    for gi in range(G):
        h = i_h * G + gi
        psi = tl.load(psi_in + (i_b * H + h) * F2 + o_f, mask=m_f, other=0.0)
        lin = tl.load(mix_w + h * S) * tl.sum(psi[:, None] * s1, axis=0)
        if S == 2:
            lin += tl.load(mix_w + h * S + 1) * tl.sum(psi[:, None] * s2, axis=0)
        out = tl.load(cl_in + i_b * H + h) * lin
        if W > 0:
            pw = tl.load(pw_in + (i_b * H + h) * W + o_w, mask=m_w, other=0.0)
            out += tl.sum(pw[:, None] * new_values, axis=0)
        tl.store(o + (i_b * H + h) * D + cols, out, mask=m_v)
    if W > 0:
        if (i_v == 0) & (i_h == 0):  # one program per sequence moves its validity row (launch 1 has read it)
            new_valid = 1.0
            if HAS_MASK:
                new_valid = tl.load(mask + i_b).to(tl.float32)
            ok = tl.load(valid + i_b * W + o_w + 1, mask=o_w < W - 1, other=0.0).to(tl.float32)
            ok = tl.where(o_w == W - 1, new_valid, ok)
            tl.debug_barrier()
            tl.store(valid + i_b * W + o_w, ok, mask=m_w)  # cast to the row's dtype by the store


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, D] whose heads and features are contiguous (any stride between sequences), dtype kept."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


@torch.no_grad()
def triton_decode_dsla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    weights,
    window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~.decode.fused_decode_dsla` by the Triton kernels (inputs checked there): ``state`` and ``window``
    updated in place, o [B, H, D] returned in q's dtype. ``weights`` is a :class:`~.decode.DecodeWeights`."""
    B, H, D = q.shape
    S, HK = state.shape[1], state.shape[2]
    F = weights.k_map.shape[-1]
    F2, W = 2 * F, 0 if window is None else window[0].shape[1]
    q, k, v = _rows(q), _rows(k), _rows(v)
    mix_w = weights.mix_weights(H, S).contiguous()
    q_map, k_map = weights.q_map.contiguous(), weights.k_map.contiguous()
    gate_w, gate_b = weights.gate_weight.contiguous(), weights.gate_bias.contiguous()
    # Unused pointers (no window, no mask) point at the state; the constexpr flags keep them unread.
    keys, values, valid = window if window is not None else (state, state, state)
    pos = positions if positions is not None else state
    inv_freq = weights.inv_freq.contiguous() if W else state
    log_scale = weights.window_log_scale.contiguous() if W else state
    mask_ = mask.float().contiguous() if mask is not None else state
    # Per-step factors handed from launch 1 to launch 2, in one scratch buffer.
    sizes = [B * HK * F2, B * HK * S * F2, B * H * F2, B * H * max(W, 1), B * H]
    phi, decay, psi, pw, cl = torch.empty(sum(sizes), device=q.device, dtype=torch.float32).split(sizes)
    o = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    BF2, BW = _next_pow2(F2), _next_pow2(W, 1)
    common = dict(H=H, HK=HK, G=H // HK, D=D, F=F, S=S, W=W, BF2=BF2, BW=BW, HAS_MASK=mask is not None)
    _decode_head_kernel[(B * HK,)](
        q, k, state, q_map, k_map, gate_w, gate_b, mix_w, keys, valid, mask_, pos, inv_freq, log_scale,
        phi, decay, psi, pw, cl,
        q.stride(0), k.stride(0), pos.stride(0) if W else 0, pos.stride(1) if W else 0, 1.0 / weights.tau,
        0.0 if weights.clamp is None else weights.clamp, weights.rope_scale, D**-0.5,
        BD=_next_pow2(D), HAS_CLAMP=weights.clamp is not None, **common,
    )  # fmt: skip
    BV = min(64, _next_pow2(D))
    _decode_values_kernel[(triton.cdiv(D, BV), B * HK)](
        v, state, mix_w, keys, values, valid, mask_, k, o, phi, decay, psi, pw, cl, k.stride(0), v.stride(0),
        BV=BV, **common,
    )  # fmt: skip
    return o
