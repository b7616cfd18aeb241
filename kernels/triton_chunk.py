"""Triton kernels for chunked DSLA on CUDA (forward, both states in one pass) and the KV fold.

Shipped in saved folders' remote code too (imported lazily, only where Triton is importable).
Interpreter-safe (``TRITON_INTERPRET=1``): no ``.to()`` on loop indices, no autotuning.

One program per (sequence, KV head, block of V columns) walks the sequence chunk by chunk, keeping both states in
registers; q, k, v and the gates of a chunk are read once for both states. Inside a chunk, query sub-chunk ``p``
(``BC`` rows) reads

- the states: ``w1 (q e^{b1}) S1 + w2 (q e^{b2}) S2``;
- each earlier sub-chunk ``r < p`` factored around the start of ``p`` (``ref``): ``(q e^{b - ref})`` and
  ``(k e^{ref - b})``, both exponents <= 0;
- its own sub-chunk pairwise, ``sum_k q_tk k_jk e^{b_tk - b_jk}`` for ``j <= t`` (exponents <= 0, masked).

No exponent is ever positive, so no gate is too strong and no clamp is needed.

With ``store_states`` the forward also writes the state before each chunk (and the final one) for the hand-written
Triton backward in ``triton_chunk_bwd``.
"""

from __future__ import annotations

import os

import torch

try:  # Transformers' remote-code check skips try blocks: a saved folder loads where Triton is not installed
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("The DSLA Triton kernels need Triton: pip install triton") from error
from .inputs import DSLAInputs


@triton.jit
def _chunk_tile(starts, HK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Offsets and mask of this program's [BT, BK] tile of a [tokens, HK, K] tensor: chunk program_id(0) of the
    (sequence, KV head) program_id(1), clipped to the sequence (all masked past its end)."""
    i_c, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HK, i_nh % HK
    bos, eos = tl.load(starts + i_n), tl.load(starts + i_n + 1)
    o_t = bos + i_c * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    return (o_t[:, None] * HK + i_h) * K + o_k[None, :], (o_t[:, None] < eos) & (o_k[None, :] < K)


@triton.jit
def _state_tile(starts, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """What a program that walks one sequence works on: program_id(0) a block of BV value columns, program_id(1) a
    (sequence, KV head). Returns (value block, sequence, KV head, its first token, its end, feature offsets, value
    offsets, their masks)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HK, i_nh % HK
    bos, eos = tl.load(starts + i_n), tl.load(starts + i_n + 1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return i_v, i_n, i_h, bos, eos, o_k, o_v, o_k < K, o_v < V


@triton.jit
def _mixing(w, h, scale, S: tl.constexpr, TWO: tl.constexpr):
    """Query head h's mixing weights of the two states (the second 0 for one state), times the scale."""
    w1 = tl.load(w + h * S) * scale
    w2 = 0.0
    if TWO:
        w2 = tl.load(w + h * S + 1) * scale
    return w1, w2


@triton.jit
def _initial_states(h0, p_state, m_kv, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, USE_H0: tl.constexpr, TWO: tl.constexpr):  # fmt: skip
    """The [BK, BV] tiles of both states at `p_state` of the initial states (zeros without them)."""
    s1 = tl.zeros([BK, BV], dtype=tl.float32)
    s2 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        s1 += tl.load(h0 + p_state, mask=m_kv, other=0.0)
        if TWO:
            s2 += tl.load(h0 + p_state + HK * K * V, mask=m_kv, other=0.0)
    return s1, s2


@triton.jit
def _sub_chunk(t0, eos, i_h, o_c, o_k, m_k, HK: tl.constexpr, K: tl.constexpr):
    """The rows of the sub-chunk from token t0, clipped to the sequence's end: their tokens and mask, and the offsets
    and mask of their [rows, K] tile in a [tokens, HK, K] tensor."""
    t = t0 + o_c
    m_t = t < eos
    return t, m_t, (t[:, None] * HK + i_h) * K + o_k[None, :], m_t[:, None] & m_k[None, :]


@triton.jit
def _chunk_cumsum_kernel(g, b, starts, T_total, HK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr):  # fmt: skip
    """b = cumulative sum of g inside each chunk of each sequence (chunks start at the sequence start)."""
    p, m = _chunk_tile(starts, HK, K, BT, BK)
    tl.store(b + p, tl.cumsum(tl.load(g + p, mask=m, other=0.0), axis=0), mask=m)


# One program per (sequence, KV head) and value block walks the sequence's chunks in order: inter-chunk term from
# the running states, intra-chunk attention, state update (and the saved states for the backward), the states never
# leaving registers. Its length is that one fused loop: a second kernel would write the states out and read them back.
@triton.jit
def _chunk_fwd_kernel(
    q, k, v, b1, b2, w, h0, ht, o, starts, hs, slots,
    scale,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    TWO: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STATES_ONLY: tl.constexpr,
    STORE_STATES: tl.constexpr,
):  # fmt: skip
    i_v, i_n, i_h, bos, eos, o_k, o_v, m_k, m_v = _state_tile(starts, HK, K, V, BK, BV)
    S: tl.constexpr = 2 if TWO else 1
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = ((i_n * S) * HK + i_h) * K * V + o_k[:, None] * V + o_v[None, :]  # state 0 of this head
    s1, s2 = _initial_states(h0, p_state, m_kv, HK, K, V, BK, BV, USE_H0, TWO)
    o_c = tl.arange(0, BC)
    if STORE_STATES:  # for the backward: the state before each chunk, then the final state ([slots, S, HK, K, V])
        slot0 = tl.load(slots + i_n).to(tl.int64)  # int64 offsets into the saved states
    for t0 in range(bos, eos, BT):
        if STORE_STATES:
            p_slot = (slot0 + (t0 - bos) // BT) * S * HK * K * V + p_state - i_n * S * HK * K * V
            tl.store(hs + p_slot, s1, mask=m_kv)
            if TWO:
                tl.store(hs + p_slot + HK * K * V, s2, mask=m_kv)
        if not STATES_ONLY:
            for p in range(0, BT // BC):
                if t0 + p * BC < eos:  # sub-chunks wholly past the end are skipped
                    tp, m_p, pk, m_pk = _sub_chunk(t0 + p * BC, eos, i_h, o_c, o_k, m_k, HK, K)  # query rows
                    # rows past the end get -inf: every factor of theirs is exp(-inf) = 0, never exp(+large)
                    bp1 = tl.where(m_pk, tl.load(b1 + pk, mask=m_pk, other=0.0), float("-inf"))
                    bp2 = tl.zeros([BC, BK], dtype=tl.float32)
                    if TWO:
                        bp2 = tl.where(m_pk, tl.load(b2 + pk, mask=m_pk, other=0.0), float("-inf"))
                    # reference: b at the row before the sub-chunk (0 at the chunk start)
                    t_ref = t0 + p * BC - 1
                    t_refv = t_ref + o_k * 0  # as a vector: masks stay tensors on every backend
                    m_ref = m_k & (t_refv >= t0) & (t_refv < eos)
                    ref1 = tl.load(b1 + (t_refv * HK + i_h) * K + o_k, mask=m_ref, other=0.0)
                    ref2 = tl.zeros([BK], dtype=tl.float32)
                    if TWO:
                        ref2 += tl.load(b2 + (t_refv * HK + i_h) * K + o_k, mask=m_ref, other=0.0)
                    for gi in range(G):
                        h = i_h * G + gi
                        w1, w2 = _mixing(w, h, scale, S, TWO)
                        qp = tl.load(q + (tp[:, None] * H + h) * K + o_k[None, :], mask=m_pk, other=0.0)
                        # states
                        acc = tl.dot(qp * tl.exp(bp1) * w1, s1)
                        if TWO:
                            acc += tl.dot(qp * tl.exp(bp2) * w2, s2)
                        # earlier sub-chunks, factored around the start of this one
                        qf1 = qp * tl.exp(bp1 - ref1[None, :]) * w1
                        qf2 = qp * tl.exp(bp2 - ref2[None, :]) * w2
                        for r in range(0, p):
                            tr, m_r, rk, m_rk = _sub_chunk(t0 + r * BC, eos, i_h, o_c, o_k, m_k, HK, K)
                            kr = tl.load(k + rk, mask=m_rk, other=0.0)
                            br1 = tl.load(b1 + rk, mask=m_rk, other=0.0)
                            a = tl.dot(qf1, tl.trans(kr * tl.exp(ref1[None, :] - br1)))
                            if TWO:
                                br2 = tl.load(b2 + rk, mask=m_rk, other=0.0)
                                a += tl.dot(qf2, tl.trans(kr * tl.exp(ref2[None, :] - br2)))
                            m_rv = m_r[:, None] & m_v[None, :]
                            vr = tl.load(v + (tr[:, None] * HK + i_h) * V + o_v[None, :], mask=m_rv, other=0.0)
                            acc += tl.dot(a, vr)
                        # own sub-chunk, pairwise: column by column
                        for j in range(0, BC):
                            tj = t0 + p * BC + j + o_k * 0  # as a vector: masks stay tensors on every backend
                            m_j = m_k & (tj < eos)
                            kj = tl.load(k + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                            bj1 = tl.load(b1 + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                            causal = (o_c[:, None] >= j) & m_k[None, :]
                            e = w1 * tl.exp(tl.where(causal, bp1 - bj1[None, :], float("-inf")))
                            if TWO:
                                bj2 = tl.load(b2 + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                                e += w2 * tl.exp(tl.where(causal, bp2 - bj2[None, :], float("-inf")))
                            a_j = tl.sum(qp * kj[None, :] * e, axis=1)  # [BC]
                            tjv = t0 + p * BC + j + o_v * 0
                            vj = tl.load(v + (tjv * HK + i_h) * V + o_v, mask=m_v & (tjv < eos), other=0.0)
                            acc += a_j[:, None] * vj[None, :]
                        tl.store(o + (tp[:, None] * H + h) * V + o_v[None, :], acc, mask=m_p[:, None] & m_v[None, :])
        # state update over the whole chunk: S = e^{bC} S + (k e^{bC - b})^T v
        tc = t0 + tl.arange(0, BT)
        m_c = tc < eos
        ck = (tc[:, None] * HK + i_h) * K + o_k[None, :]
        m_ck = m_c[:, None] & m_k[None, :]
        kc = tl.load(k + ck, mask=m_ck, other=0.0)
        vc = tl.load(v + (tc[:, None] * HK + i_h) * V + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        t_last = tl.minimum(t0 + BT + o_k * 0, eos) - 1
        bc1 = tl.load(b1 + ck, mask=m_ck, other=0.0)
        last1 = tl.load(b1 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0)
        kd1 = tl.where(m_ck, kc * tl.exp(last1[None, :] - bc1), 0.0)
        s1 = s1 * tl.exp(last1)[:, None] + tl.dot(tl.trans(kd1), vc)
        if TWO:
            bc2 = tl.load(b2 + ck, mask=m_ck, other=0.0)
            last2 = tl.load(b2 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0)
            kd2 = tl.where(m_ck, kc * tl.exp(last2[None, :] - bc2), 0.0)
            s2 = s2 * tl.exp(last2)[:, None] + tl.dot(tl.trans(kd2), vc)
    if STORE_STATES:
        p_slot = (slot0 + (eos - bos + BT - 1) // BT) * S * HK * K * V + p_state - i_n * S * HK * K * V
        tl.store(hs + p_slot, s1, mask=m_kv)
        if TWO:
            tl.store(hs + p_slot + HK * K * V, s2, mask=m_kv)
    if STORE_HT:
        tl.store(ht + p_state, s1, mask=m_kv)
        if TWO:
            tl.store(ht + p_state + HK * K * V, s2, mask=m_kv)


def _next_pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(x))


def _starts(x: DSLAInputs) -> torch.Tensor:
    """Where each sequence starts on the flat token axis, and where the last ends: int32 [N + 1]."""
    if x.cu_seqlens is None:
        return torch.arange(0, (x.B + 1) * x.T, x.T, device=x.device, dtype=torch.int32)
    return x.cu_seqlens.to(device=x.device, dtype=torch.int32)


def _cumsum(g, starts, N, max_len, HK, K, chunk_size):
    b = torch.empty_like(g)
    BK = _next_pow2(K)
    grid = (triton.cdiv(max_len, chunk_size), N * HK)
    _chunk_cumsum_kernel[grid](g, b, starts, g.shape[0], HK=HK, K=K, BT=chunk_size, BK=BK)
    return b


def _slots(starts, chunk_size):
    """Per-sequence chunk counts and the first state slot of each sequence (a sequence of ``nc`` chunks has
    ``nc + 1`` slots: the state before each chunk, then the final state)."""
    lengths = (starts[1:] - starts[:-1]).tolist()
    counts = [-(-n // chunk_size) for n in lengths]
    first = [0]
    for c in counts:
        first.append(first[-1] + c + 1)
    return counts, first


def _forward(x: DSLAInputs, chunk_size: int, states_only: bool = False, store_states: bool = False):
    """Returns (o, final state), or with ``store_states`` the dict of what the backward needs. ``states_only``: no
    queries read, no outputs (the KV fold)."""
    B, T, H, HK, G, K, V, S, N = x.B, x.T, x.H, x.HK, x.G, x.K, x.V, x.S, x.N
    BC = 16
    if chunk_size % BC:
        raise ValueError(f"the Triton kernel needs a chunk size that is a multiple of {BC}")
    starts = _starts(x)
    lengths = (starts[1:] - starts[:-1]).tolist()
    max_len = max(lengths) if lengths else 0
    # flatten the batch into one packed sequence axis: [B*T, heads, dim]
    k_, v_ = x.k.float().reshape(B * T, HK, K).contiguous(), x.v.float().reshape(B * T, HK, V).contiguous()
    q_ = x.q.float().reshape(B * T, H, K).contiguous() if not states_only else k_
    # one cumulative log decay per state (the kernels take one pointer each; b2 is b1 for a single state)
    b = [_cumsum(x.g[:, :, s].float().reshape(B * T, HK, K).contiguous(), starts, N, max_len, HK, K, chunk_size)
         for s in range(S)]  # fmt: skip
    b1, b2 = b[0], b[-1]
    w = x.mix.contiguous()
    o = torch.empty(B * T, H, V, device=x.device, dtype=torch.float32) if not states_only else k_
    h0 = x.initial_state.float().contiguous() if x.initial_state is not None else k_
    ht = torch.empty(N, S, HK, K, V, device=x.device, dtype=torch.float32) if x.output_final_state else k_
    hs, slots = k_, starts
    if store_states:
        counts, first = _slots(starts, chunk_size)
        hs = torch.empty(first[-1], S, HK, K, V, device=x.device, dtype=torch.float32)
        slots = torch.tensor(first, device=x.device, dtype=torch.int32)
    BK, BV = _next_pow2(K), min(64, _next_pow2(V))
    grid = (triton.cdiv(V, BV), N * HK)
    _chunk_fwd_kernel[grid](
        q_, k_, v_, b1, b2, w, h0, ht, o, starts, hs, slots, x.scale,
        H=H, HK=HK, G=G, K=K, V=V, BT=chunk_size, BC=BC, BK=BK, BV=BV,
        TWO=S == 2, USE_H0=x.initial_state is not None, STORE_HT=x.output_final_state, STATES_ONLY=states_only,
        STORE_STATES=store_states,
    )  # fmt: skip
    out = None if states_only else o.view(B, T, H, V).to(x.q.dtype)
    if store_states:
        return dict(
            o=out, final=hs[slots[1:].long() - 1], q=q_, k=k_, v=v_, b1=b1, b2=b2, w=w, hs=hs, slots=slots,
            counts=counts, starts=starts, N=N, S=S, H=H, HK=HK, G=G, K=K, V=V, scale=x.scale, BC=BC,
        )  # fmt: skip
    return out, (ht if x.output_final_state else None)


def chunk_dsla_triton(x: DSLAInputs, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton forward; when gradients are needed, the Triton forward (keeping the state before each chunk) and the
    hand-written Triton backward of :mod:`.triton_chunk_bwd`. CPU tensors outside the interpreter
    take the PyTorch chunked path (Triton cannot run them)."""
    if not x.v.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        from .chunk import chunk_dsla_torch

        return chunk_dsla_torch(x, chunk_size)
    if x.needs_grad:
        from .triton_chunk_bwd import chunk_dsla_triton_autograd

        return chunk_dsla_triton_autograd(x, chunk_size)
    return _forward(x, chunk_size)


def fold_kv_triton(x: DSLAInputs, chunk_size: int) -> torch.Tensor:
    with torch.no_grad():
        return _forward(x, chunk_size, states_only=True)[1]
