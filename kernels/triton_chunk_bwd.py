"""Hand-written Triton backward of the chunked DSLA kernel (both states in one pass) and its autograd Function.

Shipped in saved folders' remote code too, beside ``triton_chunk``.
Interpreter-safe (``TRITON_INTERPRET=1``): no ``.to()`` on loop indices, no autotuning.

Within a chunk let ``b`` be a state's cumulative log decay from the chunk start, ``S`` the state before the chunk
(kept by the forward), ``dS`` the gradient of the state after it, and ``w_h`` the mixing weight (times the scale)
of query head ``h``. Per state, with ``dA_h[t, i] = do_t[h] . v_i`` (``i <= t``):

    dq_t[h] = w_h (e^{b_t} (do_t[h] S^T) + sum_{i<=t} dA_h[t, i] k_i e^{b_t - b_i})
    dk_i    = sum_h w_h sum_{t>=i} dA_h[t, i] q_t[h] e^{b_t - b_i} + e^{b_C - b_i} (v_i dS^T)
    dv_i    = sum_h sum_s sum_{t>=i} A_sh[t, i] do_t[h] + sum_s (k_i e^{b_C - b_i}) dS
    dS_in   = e^{b_C} dS + sum_h w_h (q[h] e^{b})^T do[h]
    db_t    = sum_h q_t[h] dq_t[h] - k_t dk_t (+ sum_v dS S_out at the chunk's last row);  dg = reverse cumsum of db

The same stability scheme as the forward: sub-chunks of ``BC`` rows; a block of query sub-chunk ``p`` against key
sub-chunk ``r < p`` is factored around the start of ``p`` (``ref``: ``e^{b_t - ref}`` and ``e^{ref - b_i}``, both
exponents <= 0); the diagonal sub-chunk is computed pairwise (``e^{b_t - b_j}`` masked to ``j <= t``). Every
exponent is <= 0, so no gate is too strong.

Kernels:

1. ``_bwd_states_kernel`` (sequence x KV head x block of V): reverse scan over chunks; writes ``dS`` after each chunk,
   ``sum_v dS S_out`` (for the gate gradient at the chunk's last row) and the initial-state gradient.
2. ``_bwd_dqk_kernel`` (chunk x KV head x sub-chunk): ``dq`` of the ``G`` query heads, ``dk``, the per-state ``db``
   and the partial mixing-weight gradients; ``V`` is reduced in blocks.
3. ``_bwd_dv_kernel`` (chunk x KV head x sub-chunk x block of V): ``dv``.
4. ``_chunk_rev_cumsum_kernel``: ``dg`` as the reverse cumulative sum of ``db`` inside each chunk.
"""

from __future__ import annotations

from dataclasses import replace

import torch

try:  # Transformers' remote-code check skips try blocks: a saved folder loads where Triton is not installed
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("The DSLA Triton kernels need Triton: pip install triton") from error
from .inputs import DSLAInputs
from .triton_chunk import _chunk_tile, _forward, _mixing, _next_pow2, _state_tile, _sub_chunk


@triton.jit
def _chunk_rev_cumsum_kernel(x, y, starts, HK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                             BK: tl.constexpr):  # fmt: skip
    """y = reverse cumulative sum of x inside each chunk of each sequence."""
    p, m = _chunk_tile(starts, HK, K, BT, BK)
    a = tl.load(x + p, mask=m, other=0.0)
    tl.store(y + p, tl.sum(a, axis=0)[None, :] - tl.cumsum(a, axis=0) + a, mask=m)


@triton.jit
def _bwd_states_kernel(
    q, do, b1, b2, w, hs, slots, dht, dhs, dh0, dlast, starts,
    scale, n_slots,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    TWO: tl.constexpr, USE_DHT: tl.constexpr, USE_H0: tl.constexpr,
):  # fmt: skip
    i_v, i_n, i_h, bos, eos, o_k, o_v, m_k, m_v = _state_tile(starts, HK, K, V, BK, BV)
    slot0 = tl.load(slots + i_n).to(tl.int64)  # int64 offsets into the saved states
    S: tl.constexpr = 2 if TWO else 1
    m_kv = m_k[:, None] & m_v[None, :]
    p_head = (i_h * K + o_k[:, None]) * V + o_v[None, :]  # state 0 of this head inside one [S, HK, K, V] slot
    d1 = tl.zeros([BK, BV], dtype=tl.float32)
    d2 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        d1 += tl.load(dht + i_n * S * HK * K * V + p_head, mask=m_kv, other=0.0)
        if TWO:
            d2 += tl.load(dht + (i_n * S + 1) * HK * K * V + p_head, mask=m_kv, other=0.0)
    nc = (eos - bos + BT - 1) // BT
    for i in range(0, nc):
        c = nc - 1 - i
        t0 = bos + c * BT
        p_slot = (slot0 + c) * S * HK * K * V + p_head
        p_last = ((i_v * n_slots + slot0 + c) * S * HK + i_h) * K + o_k
        tl.store(dhs + p_slot, d1, mask=m_kv)
        s1 = tl.load(hs + p_slot + S * HK * K * V, mask=m_kv, other=0.0)  # the state after this chunk
        tl.store(dlast + p_last, tl.sum(d1 * s1, axis=1), mask=m_k)
        if TWO:
            tl.store(dhs + p_slot + HK * K * V, d2, mask=m_kv)
            s2 = tl.load(hs + p_slot + (S + 1) * HK * K * V, mask=m_kv, other=0.0)
            tl.store(dlast + p_last + HK * K, tl.sum(d2 * s2, axis=1), mask=m_k)
        tc = t0 + tl.arange(0, BT)
        m_c = tc < eos
        ck = (tc[:, None] * HK + i_h) * K + o_k[None, :]
        m_ck = m_c[:, None] & m_k[None, :]
        t_last = tl.minimum(t0 + BT + o_k * 0, eos) - 1
        e1 = tl.exp(tl.load(b1 + ck, mask=m_ck, other=0.0))
        d1 = d1 * tl.exp(tl.load(b1 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0))[:, None]
        e2 = e1
        if TWO:
            e2 = tl.exp(tl.load(b2 + ck, mask=m_ck, other=0.0))
            d2 = d2 * tl.exp(tl.load(b2 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0))[:, None]
        for gi in range(G):
            h = i_h * G + gi
            qc = tl.load(q + (tc[:, None] * H + h) * K + o_k[None, :], mask=m_ck, other=0.0)
            doc = tl.load(do + (tc[:, None] * H + h) * V + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
            d1 += tl.dot(tl.trans(qc * e1 * (tl.load(w + h * S) * scale)), doc)
            if TWO:
                d2 += tl.dot(tl.trans(qc * e2 * (tl.load(w + h * S + 1) * scale)), doc)
    if USE_H0:
        tl.store(dh0 + i_n * S * HK * K * V + p_head, d1, mask=m_kv)
        if TWO:
            tl.store(dh0 + (i_n * S + 1) * HK * K * V + p_head, d2, mask=m_kv)


# One program per (chunk, KV head) and state: the query, key and gate gradients of a chunk from its saved state,
# the state's gradient and the intra-chunk attention, kept in registers from the loads to the stores. Its length is
# that one fused pass; helpers would still inline into it, and splitting it into kernels would re-read the chunk.
@triton.jit
def _bwd_dqk_kernel(
    q, k, v, do, b1, b2, w, hs, dhs, slots, dlast, starts, chunks, dq, dk, db1, db2, dw,
    scale,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, TWO: tl.constexpr,
):  # fmt: skip
    i_ch, i_s = tl.program_id(0), tl.program_id(1)
    i_x, i_h = i_ch // HK, i_ch % HK
    i_n, c = tl.load(chunks + i_x * 2), tl.load(chunks + i_x * 2 + 1)
    bos, eos = tl.load(starts + i_n), tl.load(starts + i_n + 1)
    S: tl.constexpr = 2 if TWO else 1
    NS: tl.constexpr = BT // BC
    NV: tl.constexpr = (V + BV - 1) // BV
    t0 = bos + c * BT
    ts = t0 + i_s * BC
    if ts < eos:
        o_c = tl.arange(0, BC)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        ti = ts + o_c
        m_i = ti < eos
        ik = (ti[:, None] * HK + i_h) * K + o_k[None, :]
        m_ik = m_i[:, None] & m_k[None, :]
        slot = tl.load(slots + i_n).to(tl.int64) + c  # int64 offsets into the saved states
        p_hd = (i_h * K + o_k[:, None]) * V  # + o_v: state 0 of this head inside one slot
        k_i = tl.load(k + ik, mask=m_ik, other=0.0)
        b1_i = tl.load(b1 + ik, mask=m_ik, other=0.0)
        bq1 = tl.where(m_ik, b1_i, float("-inf"))  # rows past the end: every factor exp(-inf) = 0
        t_refv = ts - 1 + o_k * 0
        m_ref = m_k & (t_refv >= t0)
        ref1 = tl.load(b1 + (t_refv * HK + i_h) * K + o_k, mask=m_ref, other=0.0)
        t_last = tl.minimum(t0 + BT + o_k * 0, eos) - 1
        last1 = tl.load(b1 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0)
        b2_i = b1_i
        bq2 = bq1
        ref2 = ref1
        last2 = last1
        if TWO:
            b2_i = tl.load(b2 + ik, mask=m_ik, other=0.0)
            bq2 = tl.where(m_ik, b2_i, float("-inf"))
            ref2 = tl.load(b2 + (t_refv * HK + i_h) * K + o_k, mask=m_ref, other=0.0)
            last2 = tl.load(b2 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0)
        dk1 = tl.zeros([BC, BK], dtype=tl.float32)
        dk2 = tl.zeros([BC, BK], dtype=tl.float32)
        qdq1 = tl.zeros([BC, BK], dtype=tl.float32)
        qdq2 = tl.zeros([BC, BK], dtype=tl.float32)
        for gi in range(G):
            h = i_h * G + gi
            w1, w2 = _mixing(w, h, scale, S, TWO)
            q_i = tl.load(q + (ti[:, None] * H + h) * K + o_k[None, :], mask=m_ik, other=0.0)
            # per-state dq without the mixing weight; the diagonal dA; the state term, V in blocks
            dq1 = tl.zeros([BC, BK], dtype=tl.float32)
            dq2 = tl.zeros([BC, BK], dtype=tl.float32)
            dA = tl.zeros([BC, BC], dtype=tl.float32)
            for i_v in range(NV):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < V
                m_iv = m_i[:, None] & m_v[None, :]
                do_i = tl.load(do + (ti[:, None] * H + h) * V + o_v[None, :], mask=m_iv, other=0.0)
                v_i = tl.load(v + (ti[:, None] * HK + i_h) * V + o_v[None, :], mask=m_iv, other=0.0)
                dA += tl.dot(do_i, tl.trans(v_i))
                m_kv = m_k[:, None] & m_v[None, :]
                s1 = tl.load(hs + slot * S * HK * K * V + p_hd + o_v[None, :], mask=m_kv, other=0.0)
                dq1 += tl.dot(do_i, tl.trans(s1))
                if TWO:
                    s2 = tl.load(hs + (slot * S + 1) * HK * K * V + p_hd + o_v[None, :], mask=m_kv, other=0.0)
                    dq2 += tl.dot(do_i, tl.trans(s2))
            dq1 = dq1 * tl.exp(bq1)
            dq2 = dq2 * tl.exp(bq2)
            # earlier key sub-chunks, factored around the start of this one
            f1 = tl.zeros([BC, BK], dtype=tl.float32)
            f2 = tl.zeros([BC, BK], dtype=tl.float32)
            for r in range(0, i_s):
                tr = t0 + r * BC + o_c  # wholly before this sub-chunk: all rows valid
                rk = (tr[:, None] * HK + i_h) * K + o_k[None, :]
                dAr = tl.zeros([BC, BC], dtype=tl.float32)
                for i_v in range(NV):
                    o_v = i_v * BV + tl.arange(0, BV)
                    m_iv = m_i[:, None] & (o_v < V)[None, :]
                    do_i = tl.load(do + (ti[:, None] * H + h) * V + o_v[None, :], mask=m_iv, other=0.0)
                    v_r = tl.load(v + (tr[:, None] * HK + i_h) * V + o_v[None, :], mask=(o_v < V)[None, :], other=0.0)
                    dAr += tl.dot(do_i, tl.trans(v_r))
                k_r = tl.load(k + rk, mask=m_k[None, :], other=0.0)
                f1 += tl.dot(dAr, k_r * tl.exp(ref1[None, :] - tl.load(b1 + rk, mask=m_k[None, :], other=0.0)))
                if TWO:
                    f2 += tl.dot(dAr, k_r * tl.exp(ref2[None, :] - tl.load(b2 + rk, mask=m_k[None, :], other=0.0)))
            dq1 += f1 * tl.exp(bq1 - ref1[None, :])
            dq2 += f2 * tl.exp(bq2 - ref2[None, :])
            # own sub-chunk, pairwise: column j of dA feeds dq (rows t >= j) and row j of dk
            for j in range(0, BC):
                tj = ts + j + o_k * 0
                m_j = m_k & (tj < eos)
                kj = tl.load(k + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                col = tl.sum(tl.where(o_c[None, :] == j, dA, 0.0), axis=1)[:, None]  # [BC, 1]
                causal = (o_c[:, None] >= j) & m_k[None, :]
                row = o_c[:, None] == j
                bj1 = tl.load(b1 + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                e1 = tl.exp(tl.where(causal, bq1 - bj1[None, :], float("-inf")))
                dq1 += col * kj[None, :] * e1
                dk1 += tl.where(row, w1 * tl.sum(col * q_i * e1, axis=0)[None, :], 0.0)
                if TWO:
                    bj2 = tl.load(b2 + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                    e2 = tl.exp(tl.where(causal, bq2 - bj2[None, :], float("-inf")))
                    dq2 += col * kj[None, :] * e2
                    dk2 += tl.where(row, w2 * tl.sum(col * q_i * e2, axis=0)[None, :], 0.0)
            # later query sub-chunks against these keys, factored around the start of the query sub-chunk
            for p in range(i_s + 1, NS):
                if t0 + p * BC < eos:
                    tp, m_p, pk, m_pk = _sub_chunk(t0 + p * BC, eos, i_h, o_c, o_k, m_k, HK, K)
                    q_p = tl.load(q + (tp[:, None] * H + h) * K + o_k[None, :], mask=m_pk, other=0.0)
                    dAp = tl.zeros([BC, BC], dtype=tl.float32)
                    for i_v in range(NV):
                        o_v = i_v * BV + tl.arange(0, BV)
                        m_v = o_v < V
                        m_pv, m_iv = m_p[:, None] & m_v[None, :], m_i[:, None] & m_v[None, :]
                        do_p = tl.load(do + (tp[:, None] * H + h) * V + o_v[None, :], mask=m_pv, other=0.0)
                        v_i = tl.load(v + (ti[:, None] * HK + i_h) * V + o_v[None, :], mask=m_iv, other=0.0)
                        dAp += tl.dot(do_p, tl.trans(v_i))
                    t_pref = t0 + p * BC - 1 + o_k * 0
                    pref1 = tl.load(b1 + (t_pref * HK + i_h) * K + o_k, mask=m_k, other=0.0)
                    bp1 = tl.where(m_pk, tl.load(b1 + pk, mask=m_pk, other=0.0), float("-inf"))
                    ek1 = tl.where(m_ik, tl.exp(pref1[None, :] - b1_i), 0.0)
                    dk1 += w1 * ek1 * tl.dot(tl.trans(dAp), q_p * tl.exp(bp1 - pref1[None, :]))
                    if TWO:
                        pref2 = tl.load(b2 + (t_pref * HK + i_h) * K + o_k, mask=m_k, other=0.0)
                        bp2 = tl.where(m_pk, tl.load(b2 + pk, mask=m_pk, other=0.0), float("-inf"))
                        ek2 = tl.where(m_ik, tl.exp(pref2[None, :] - b2_i), 0.0)
                        dk2 += w2 * ek2 * tl.dot(tl.trans(dAp), q_p * tl.exp(bp2 - pref2[None, :]))
            tl.store(dq + (ti[:, None] * H + h) * K + o_k[None, :], w1 * dq1 + w2 * dq2, mask=m_ik)
            p_dw = ((i_x * NS + i_s) * H + h) * S
            tl.store(dw + p_dw, tl.sum(tl.sum(q_i * dq1, axis=1), axis=0) * scale)
            qdq1 += w1 * q_i * dq1
            if TWO:
                tl.store(dw + p_dw + 1, tl.sum(tl.sum(q_i * dq2, axis=1), axis=0) * scale)
                qdq2 += w2 * q_i * dq2
        # the keys' share of the state after the chunk: e^{b_C - b_i} (v_i dS^T)
        u1 = tl.zeros([BC, BK], dtype=tl.float32)
        u2 = tl.zeros([BC, BK], dtype=tl.float32)
        for i_v in range(NV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            v_i = tl.load(v + (ti[:, None] * HK + i_h) * V + o_v[None, :], mask=m_i[:, None] & m_v[None, :], other=0.0)
            m_kv = m_k[:, None] & m_v[None, :]
            u1 += tl.dot(
                v_i, tl.trans(tl.load(dhs + slot * S * HK * K * V + p_hd + o_v[None, :], mask=m_kv, other=0.0))
            )
            if TWO:
                ds2 = tl.load(dhs + (slot * S + 1) * HK * K * V + p_hd + o_v[None, :], mask=m_kv, other=0.0)
                u2 += tl.dot(v_i, tl.trans(ds2))
        dk1 += u1 * tl.where(m_ik, tl.exp(last1[None, :] - b1_i), 0.0)
        is_last = ti[:, None] == t_last[None, :]
        p_last = (slot * S * HK + i_h) * K + o_k
        db = qdq1 - k_i * dk1 + tl.where(is_last, tl.load(dlast + p_last, mask=m_k, other=0.0)[None, :], 0.0)
        tl.store(db1 + ik, db, mask=m_ik)
        if TWO:
            dk2 += u2 * tl.where(m_ik, tl.exp(last2[None, :] - b2_i), 0.0)
            db = (
                qdq2
                - k_i * dk2
                + tl.where(is_last, tl.load(dlast + p_last + HK * K, mask=m_k, other=0.0)[None, :], 0.0)
            )
            tl.store(db2 + ik, db, mask=m_ik)
        tl.store(dk + ik, dk1 + dk2, mask=m_ik)


# One program per (chunk, KV head), state and value block: the value gradient of a chunk (state and intra-chunk
# terms) in one pass over its registers; long for the same reason as _bwd_dqk_kernel.
@triton.jit
def _bwd_dv_kernel(
    q, k, do, b1, b2, w, dhs, slots, starts, chunks, dv,
    scale,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, TWO: tl.constexpr,
):  # fmt: skip
    i_ch, i_s, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_x, i_h = i_ch // HK, i_ch % HK
    i_n, c = tl.load(chunks + i_x * 2), tl.load(chunks + i_x * 2 + 1)
    bos, eos = tl.load(starts + i_n), tl.load(starts + i_n + 1)
    S: tl.constexpr = 2 if TWO else 1
    NS: tl.constexpr = BT // BC
    t0 = bos + c * BT
    ts = t0 + i_s * BC
    if ts < eos:
        o_c = tl.arange(0, BC)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        ti = ts + o_c
        m_i = ti < eos
        m_iv = m_i[:, None] & m_v[None, :]
        ik = (ti[:, None] * HK + i_h) * K + o_k[None, :]
        m_ik = m_i[:, None] & m_k[None, :]
        slot = tl.load(slots + i_n).to(tl.int64) + c  # int64 offsets into the saved states
        p_st = slot * S * HK * K * V + (i_h * K + o_k[:, None]) * V + o_v[None, :]
        t_last = tl.minimum(t0 + BT + o_k * 0, eos) - 1
        k_i = tl.load(k + ik, mask=m_ik, other=0.0)
        b1_i = tl.load(b1 + ik, mask=m_ik, other=0.0)
        bq1 = tl.where(m_ik, b1_i, float("-inf"))
        last1 = tl.load(b1 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0)
        # the values' share of the state after the chunk: (k_i e^{b_C - b_i}) dS
        kd = tl.where(m_ik, k_i * tl.exp(last1[None, :] - b1_i), 0.0)
        acc = tl.dot(kd, tl.load(dhs + p_st, mask=m_kv, other=0.0))
        b2_i = b1_i
        bq2 = bq1
        if TWO:
            b2_i = tl.load(b2 + ik, mask=m_ik, other=0.0)
            bq2 = tl.where(m_ik, b2_i, float("-inf"))
            last2 = tl.load(b2 + (t_last * HK + i_h) * K + o_k, mask=m_k, other=0.0)
            kd = tl.where(m_ik, k_i * tl.exp(last2[None, :] - b2_i), 0.0)
            acc += tl.dot(kd, tl.load(dhs + p_st + HK * K * V, mask=m_kv, other=0.0))
        for gi in range(G):
            h = i_h * G + gi
            w1, w2 = _mixing(w, h, scale, S, TWO)
            q_i = tl.load(q + (ti[:, None] * H + h) * K + o_k[None, :], mask=m_ik, other=0.0)
            do_i = tl.load(do + (ti[:, None] * H + h) * V + o_v[None, :], mask=m_iv, other=0.0)
            # own sub-chunk, pairwise: column j of the mixed attention matrix gives row j of dv
            for j in range(0, BC):
                tj = ts + j + o_k * 0
                m_j = m_k & (tj < eos)
                kj = tl.load(k + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                causal = (o_c[:, None] >= j) & m_k[None, :]
                bj1 = tl.load(b1 + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                e = w1 * tl.exp(tl.where(causal, bq1 - bj1[None, :], float("-inf")))
                if TWO:
                    bj2 = tl.load(b2 + (tj * HK + i_h) * K + o_k, mask=m_j, other=0.0)
                    e += w2 * tl.exp(tl.where(causal, bq2 - bj2[None, :], float("-inf")))
                a_j = tl.sum(q_i * kj[None, :] * e, axis=1)  # [BC]: A[t, j]
                acc += tl.where(o_c[:, None] == j, tl.sum(a_j[:, None] * do_i, axis=0)[None, :], 0.0)
            # later query sub-chunks, factored around their start
            for p in range(i_s + 1, NS):
                if t0 + p * BC < eos:
                    tp, m_p, pk, m_pk = _sub_chunk(t0 + p * BC, eos, i_h, o_c, o_k, m_k, HK, K)
                    q_p = tl.load(q + (tp[:, None] * H + h) * K + o_k[None, :], mask=m_pk, other=0.0)
                    t_pref = t0 + p * BC - 1 + o_k * 0
                    pref1 = tl.load(b1 + (t_pref * HK + i_h) * K + o_k, mask=m_k, other=0.0)
                    bp1 = tl.where(m_pk, tl.load(b1 + pk, mask=m_pk, other=0.0), float("-inf"))
                    ek1 = tl.where(m_ik, k_i * tl.exp(pref1[None, :] - b1_i), 0.0)
                    a = tl.dot(q_p * tl.exp(bp1 - pref1[None, :]) * w1, tl.trans(ek1))  # [BC(p), BC(i)]
                    if TWO:
                        pref2 = tl.load(b2 + (t_pref * HK + i_h) * K + o_k, mask=m_k, other=0.0)
                        bp2 = tl.where(m_pk, tl.load(b2 + pk, mask=m_pk, other=0.0), float("-inf"))
                        ek2 = tl.where(m_ik, k_i * tl.exp(pref2[None, :] - b2_i), 0.0)
                        a += tl.dot(q_p * tl.exp(bp2 - pref2[None, :]) * w2, tl.trans(ek2))
                    do_p = tl.load(do + (tp[:, None] * H + h) * V + o_v[None, :], mask=m_p[:, None] & m_v[None, :],
                                   other=0.0)  # fmt: skip
                    acc += tl.dot(tl.trans(a), do_p)
        tl.store(dv + (ti[:, None] * HK + i_h) * V + o_v[None, :], acc, mask=m_iv)


def _backward(st, do, dfinal, chunk_size, need_dh0):
    """Gradients from the forward's saved dict ``st``: (dq, dk, dv, dg [S, B*T, HK, K], dw [H, S], dh0) on the flat
    layout."""
    H, HK, G, K, V, S, N, BC = (st[x] for x in ("H", "HK", "G", "K", "V", "S", "N", "BC"))
    q, k, v, b1, b2, w, hs, slots, starts = (st[x] for x in ("q", "k", "v", "b1", "b2", "w", "hs", "slots", "starts"))
    scale, BT = st["scale"], chunk_size
    TT, dev = k.shape[0], k.device
    chunk_list = [(n, c) for n, count in enumerate(st["counts"]) for c in range(count)]
    n_chunks, n_slots, NS = len(chunk_list), hs.shape[0], BT // BC
    BK, BV = _next_pow2(K), min(64, _next_pow2(V))
    NV = triton.cdiv(V, BV)
    do = do.float().reshape(TT, H, V).contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dg = torch.zeros(S, *b1.shape, device=dev, dtype=torch.float32)  # a buffer per state, a pointer each
    db1, db2 = dg[0], dg[-1]
    dw = torch.zeros(max(n_chunks, 1), NS, H, S, device=dev)
    dh0 = torch.empty(N, S, HK, K, V, device=dev) if need_dh0 else k
    if N == 0:
        return dq, dk, dv, dg, dw.sum((0, 1)), dh0
    dhs = torch.zeros_like(hs)
    dlast = torch.zeros(NV, n_slots, S, HK, K, device=dev)
    dht = dfinal.float().contiguous() if dfinal is not None else k
    _bwd_states_kernel[(NV, N * HK)](
        q, do, b1, b2, w, hs, slots, dht, dhs, dh0, dlast, starts, scale, n_slots,
        H=H, HK=HK, G=G, K=K, V=V, BT=BT, BK=BK, BV=BV,
        TWO=S == 2, USE_DHT=dfinal is not None, USE_H0=need_dh0,
    )  # fmt: skip
    if n_chunks:
        dlast = dlast.sum(0)
        chunks = torch.tensor(chunk_list, device=dev, dtype=torch.int32)
        common = dict(H=H, HK=HK, G=G, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV, TWO=S == 2)
        _bwd_dqk_kernel[(n_chunks * HK, NS)](
            q, k, v, do, b1, b2, w, hs, dhs, slots, dlast, starts, chunks, dq, dk, db1, db2, dw, scale, **common
        )
        _bwd_dv_kernel[(n_chunks * HK, NS, NV)](q, k, do, b1, b2, w, dhs, slots, starts, chunks, dv, scale, **common)
        max_len = max(st["counts"]) * BT
        for db in dg:  # each state's, in place
            _chunk_rev_cumsum_kernel[(triton.cdiv(max_len, BT), N * HK)](db, db, starts, HK=HK, K=K, BT=BT, BK=BK)
    return dq, dk, dv, dg, dw.sum((0, 1)), dh0


class ChunkDSLATritonFunction(torch.autograd.Function):
    """Triton forward (keeping the state before each chunk) and the hand-written Triton backward.

    ``x`` holds the inputs (its mixing weights fp32 [H, S], without the scale); the tensors after ``chunk_size``
    are its q, k, v, g, mix and initial_state again, for autograd to see them."""

    @staticmethod
    def forward(ctx, x: DSLAInputs, chunk_size: int, *tensors):
        st = _forward(replace(x, output_final_state=False), chunk_size, store_states=True)
        ctx.st, ctx.chunk_size = st, chunk_size
        ctx.dtypes = [None if t is None else t.dtype for t in tensors]
        ctx.shapes = [None if t is None else t.shape for t in tensors]
        return st["o"], st["final"]

    @staticmethod
    def backward(ctx, do, dfinal):
        st = ctx.st
        if do is None:
            do = st["q"].new_zeros(*ctx.shapes[0][:3], st["V"])
        dq, dk, dv, dg, dw, dh0 = _backward(st, do, dfinal, ctx.chunk_size, need_dh0=ctx.shapes[5] is not None)
        ctx.st = None
        B, T = ctx.shapes[3][:2]
        # [S, B*T, HK, K] -> [B, T, S, HK, K], in the memory order of the gates' shape (as the model's gates are)
        dg = dg.view(st["S"], B, T, st["HK"], st["K"]).permute(1, 2, 0, 3, 4).contiguous()
        grads = []
        for i, (t, dtype, shape) in enumerate(zip((dq, dk, dv, dg, dw, dh0), ctx.dtypes, ctx.shapes)):
            if dtype is None or not ctx.needs_input_grad[i + 2]:
                grads.append(None)
            else:
                grads.append(t.reshape(shape).to(dtype))
        return (None, None, *grads)


def chunk_dsla_triton_autograd(x: DSLAInputs, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    tensors = (x.q, x.k, x.v, x.g, x.mix, x.initial_state)
    o, final = ChunkDSLATritonFunction.apply(x, chunk_size, *tensors)
    return o, (final if x.output_final_state else None)
