"""Chunked DSLA for prefill and training: the optimised PyTorch path (CPU) with a hand-written backward.

Within a chunk of ``C`` tokens (64) let ``b_t`` be the cumulative log decay of a state from the chunk start
(inclusive). Then, per state and KV head, with ``S`` the state before the chunk,

    o_t   = q_t e^{b_t} S + sum_{i<=t} (q_t e^{b_t - b_i} . k_i) v_i          (times the mixing weight)
    S_out = e^{b_C} S + sum_i (k_i e^{b_C - b_i})^T v_i

All work is done by batched matmuls over ``[batch, kv head, chunk]``; the ``G`` query heads of a KV group are
extra rows of the same products, and the two states share one matmul for the inter-chunk term (2K columns) and
one for the intra-chunk term (the mixed attention matrix). The only sequential part is a scan over chunks of the
per-chunk states.

Stability: ``e^{b_t - b_i}`` must never be formed as ``e^{b_t} e^{-b_i}`` when ``-b`` can be large. For each
state the kernel picks, from the gates it is given, the cheapest exact factoring whose exponents stay below
``SAFE_EXPONENT`` in magnitude:

- ``full``: the whole chunk factors around its start (weak decay, the usual history state);
- ``sub``: secondary sub-chunks of 16 tokens, each query sub-chunk ``p`` factoring around its own start
  ``r_p``: ``q_t e^{b_t - b_r}`` (exponent <= 0) and ``k_i e^{b_r - b_i}`` (<= 0 for earlier sub-chunks, and
  at most the sub-chunk's own decay for the diagonal block);
- ``exact``: as ``sub`` for the blocks below the diagonal, and the diagonal 16x16 blocks computed pairwise,
  ``sum_k q_tk k_ik e^{b_tk - b_ik}`` with every exponent <= 0: no gate is too strong.

Exponents outside the causal region are masked to ``-inf`` before ``exp``, so nothing overflows, in any mode.

The gate gradient uses the identity ``dL/db_t = q_t . dq_t - k_t . dk_t`` (per state, per feature, from the
state's own share of ``dq`` and ``dk``) plus ``sum_v dS_out * S_out`` at the chunk's last position, followed by a
reverse cumulative sum inside the chunk.
"""

from __future__ import annotations

import torch

from .dispatch import fp32_compute, implementation, resolve_backend
from .features import HedgehogFeatures
from .gates import LinearGates
from .inputs import BLOCK_TOKENS, CHUNK, INFERENCE_CHUNK, DSLAInputs, check_inputs

SAFE_EXPONENT = 60.0  # e^60 ~ 1e26: leaves ~12 orders of magnitude of fp32 range for q.k and sums
SUB_CHUNK = 16


# ----------------------------------------------------------------------------------------------------------------
# layout: [B, T, heads, ...] <-> [Bs, heads, chunks, C, ...]


class _Layout:
    """How the (possibly packed) time axis maps onto chunks.

    Without ``cu_seqlens`` every batch row is a sequence padded at its end to a multiple of ``C`` (``Bs = B``).
    With ``cu_seqlens`` (``B == 1``) each sequence is padded to a multiple of ``C`` on its own and the sequences'
    chunks are laid end to end (``Bs = 1``); ``spans`` gives each sequence's (batch row, first chunk, end chunk).
    Padding is zeros: no contribution and no decay, so states pass through it untouched.
    """

    def __init__(self, B: int, T: int, C: int, cu_seqlens: torch.LongTensor | None, device):
        self.B, self.T, self.C = B, T, C
        self.varlen = cu_seqlens is not None
        if not self.varlen:
            self.n = max(1, -(-T // C))
            self.Bs = B
            self.spans = [(slice(None), 0, self.n)]
            self.num_seqs = B
            return
        bounds = [int(x) for x in cu_seqlens.tolist()]
        self.num_seqs = len(bounds) - 1
        self.Bs = 1
        src, spans, chunk = [], [], 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            length = end - start
            chunks = max(1, -(-length // C))
            src.append(torch.arange(start, end))
            src.append(torch.full((chunks * C - length,), T, dtype=torch.long))  # index T is the zero pad
            spans.append((slice(0, 1), chunk, chunk + chunks))
            chunk += chunks
        self.n = chunk
        self.spans = spans
        self.src = torch.cat(src).to(device)  # padded position -> source token (or T for padding)
        self.dst = (self.src < T).nonzero().squeeze(1)  # source token t sits at padded position dst[t]

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, *rest] -> [Bs, n, C, *rest] (zero padded)."""
        rest = x.shape[2:]
        if self.varlen:
            x = torch.cat([x[0], x.new_zeros(1, *rest)])[self.src]
            return x.view(1, self.n, self.C, *rest)
        pad = self.n * self.C - self.T
        if pad:
            x = torch.cat([x, x.new_zeros(self.B, pad, *rest)], dim=1)
        return x.view(self.B, self.n, self.C, *rest)

    def from_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[Bs, n, C, *rest] -> [B, T, *rest]."""
        rest = x.shape[3:]
        x = x.reshape(self.Bs, self.n * self.C, *rest)
        if self.varlen:
            if len(self.dst) == self.T:
                return x[0, self.dst][None]
            # sequences that do not cover [0, T): the tokens outside them are zeros, as in the naive recurrence
            out = x.new_zeros(1, self.T, *rest)
            out[0, self.src[self.dst]] = x[0, self.dst]
            return out
        return x[:, : self.T].contiguous()


class _Block:
    """Layout of a block of whole chunks of a (non-packed) batch."""

    varlen = False

    def __init__(self, n: int):
        self.n = n
        self.spans = [(slice(None), 0, n)]


def _scan(decay, U, h0, layout, Sin=None):
    """States before each chunk (written into ``Sin`` when given) and final states.
    decay [Bs,HK,n,S,K], U [Bs,HK,n,S,K,V], h0 [N,S,HK,K,V] or None. Returns finals [N,S,HK,K,V]."""
    finals = []
    decay = decay.unsqueeze(-1)
    for idx, (rows, c0, c1) in enumerate(layout.spans):
        if h0 is None:
            cur = U.new_zeros(U[rows, :, 0].shape)
        elif layout.varlen:
            cur = h0[idx].transpose(0, 1)[None].float()
        else:
            cur = h0.transpose(1, 2).float()
        if Sin is not None:
            Sin[rows, :, c0] = cur
            for c in range(c0 + 1, c1):
                torch.addcmul(U[rows, :, c - 1], decay[rows, :, c - 1], Sin[rows, :, c - 1], out=Sin[rows, :, c])
            cur = Sin[rows, :, c1 - 1]
            cur = torch.addcmul(U[rows, :, c1 - 1], decay[rows, :, c1 - 1], cur)
        else:
            for c in range(c0, c1):
                cur = torch.addcmul(U[rows, :, c], decay[rows, :, c], cur)
        finals.append(cur.transpose(1, 2))  # [b, S, HK, K, V]
    return torch.cat(finals)


def _reverse_scan(decay, dSin_local, dfinal, layout):
    """Gradient w.r.t. the state after each chunk, and w.r.t. the initial states."""
    dSout = torch.empty_like(dSin_local)
    dh0 = []
    decay = decay.unsqueeze(-1)
    for idx, (rows, c0, c1) in enumerate(layout.spans):
        if dfinal is None:
            dSout[rows, :, c1 - 1] = 0.0
        elif layout.varlen:
            dSout[rows, :, c1 - 1] = dfinal[idx].transpose(0, 1)[None].float()
        else:
            dSout[rows, :, c1 - 1] = dfinal.transpose(1, 2).float()
        for c in range(c1 - 1, c0, -1):
            torch.addcmul(dSin_local[rows, :, c], decay[rows, :, c], dSout[rows, :, c], out=dSout[rows, :, c - 1])
        cur = torch.addcmul(dSin_local[rows, :, c0], decay[rows, :, c0], dSout[rows, :, c0])
        dh0.append(cur.transpose(1, 2))
    return dSout, torch.cat(dh0)


# ----------------------------------------------------------------------------------------------------------------
# intra-chunk attention matrix of one state, stable factorings


def _choose_mode(b: torch.Tensor, s: int) -> str:
    """b [Bs,HK,n,C,K] cumulative log decay in the chunk (non-increasing when gates are <= 0)."""
    lo, hi = torch.aminmax(b)
    if max(-float(lo), float(hi)) <= SAFE_EXPONENT:
        return "full"
    C = b.shape[-2]
    if C % s == 0 and C > s:
        ends = b[..., s - 1 :: s, :]  # [.., nb, K] b at the end of each sub-chunk
        starts = torch.cat([torch.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], dim=-2)
        if float((starts - ends).amax()) <= SAFE_EXPONENT:
            return "sub"
    return "exact"


def _causal(C: int, device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


class _Intra:
    """A[g, t, i] = sum_k q[g,t,k] k[i,k] exp(b[t,k] - b[i,k]) for i <= t (zero above the diagonal)."""

    def __init__(self, q, k, b, mode, s=SUB_CHUNK):
        # q [X.., G, C, K], k [X.., C, K], b [X.., C, K]
        self.mode, self.q, self.k, self.b = mode, q, k, b
        C = k.shape[-2]
        self.C = C
        if mode != "full" and (C % s or C <= s):
            self.mode, s = "exact", C
        self.s = s

    def forward(self) -> torch.Tensor:
        q, k, b, C = self.q, self.k, self.b, self.C
        G, K = q.shape[-3], q.shape[-1]
        lead = k.shape[:-2]
        mask = _causal(C, q.device)
        if self.mode == "full":
            self.Qs = q * b.exp().unsqueeze(-3)
            self.Ks = k * (-b).exp()
            A = self.Qs.reshape(*lead, G * C, K) @ self.Ks.transpose(-1, -2)
            return A.view(*lead, G, C, C).masked_fill_(~mask, 0.0)
        s, nb = self.s, C // self.s
        ends = b[..., s - 1 :: s, :]
        R = torch.cat([torch.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], dim=-2)  # [.., nb, K]
        b5 = b.view(*lead, nb, s, K)
        self.Eq = (b5 - R.unsqueeze(-2)).exp()  # [.., nb, s, K], exponents <= 0
        self.Qs = q.view(*lead, G, nb, s, K) * self.Eq.unsqueeze(-4)
        cols = torch.arange(C, device=q.device)
        blocks = torch.arange(nb, device=q.device)[:, None]
        keep = cols[None, :] < (blocks + 1) * s if self.mode == "sub" else cols[None, :] < blocks * s  # [nb, C]
        expo = (R.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~keep[..., None], float("-inf"))
        self.E = expo.exp()  # [.., nb, C, K]
        self.Ks = k.unsqueeze(-3) * self.E
        A = torch.einsum("...gpsk,...pik->...gpsi", self.Qs, self.Ks).reshape(*lead, G, C, C)
        if self.mode == "exact":
            tri = _causal(s, q.device)
            d = (b5.unsqueeze(-2) - b5.unsqueeze(-3)).masked_fill(~tri[..., None], float("-inf"))
            self.D = d.exp()  # [.., nb, s(t), s(i), K]
            self.P = k.view(*lead, nb, 1, s, K) * self.D
            self.q5 = q.view(*lead, G, nb, s, K)
            Ad = torch.einsum("...gptk,...ptik->...gpti", self.q5, self.P)
            A6 = A.view(*lead, G, nb, s, nb, s)
            for p in range(nb):
                A6[..., p, :, p, :] += Ad[..., p, :, :]
        return A.masked_fill_(~mask, 0.0)

    def backward(self, dA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dA [X.., G, C, C] (zero above the diagonal) -> (dq [X.., G, C, K], dk [X.., C, K])."""
        b, C = self.b, self.C
        G, K = self.q.shape[-3], self.q.shape[-1]
        lead = self.k.shape[:-2]
        if self.mode == "full":
            dA2 = dA.reshape(*lead, G * C, C)
            dq = (dA2 @ self.Ks).view(*lead, G, C, K) * b.exp().unsqueeze(-3)
            dk = (dA2.transpose(-1, -2) @ self.Qs.reshape(*lead, G * C, K)) * (-b).exp()
            return dq, dk
        s, nb = self.s, C // self.s
        dA5 = dA.reshape(*lead, G, nb, s, C)
        dq = torch.einsum("...gpsi,...pik->...gpsk", dA5, self.Ks) * self.Eq.unsqueeze(-4)
        dk = (torch.einsum("...gpsi,...gpsk->...pik", dA5, self.Qs) * self.E).sum(-3)
        if self.mode == "exact":
            dA6 = dA.reshape(*lead, G, nb, s, nb, s)
            dAd = torch.stack([dA6[..., p, :, p, :] for p in range(nb)], dim=-3)  # [.., G, nb, s, s]
            dq = dq + torch.einsum("...gpti,...ptik->...gptk", dAd, self.P)
            dP = torch.einsum("...gpti,...gptk->...ptik", dAd, self.q5)
            dk = dk + (dP * self.D).sum(-3).reshape(*lead, C, K)
        return dq.reshape(*lead, G, C, K), dk


# ----------------------------------------------------------------------------------------------------------------
# autograd function on the chunk layout


def _chunk_forward(q, k, v, g, w, h0, layout, store_for_backward: bool, out_buffer=None):
    """q [Bs,HK,n,G,C,K], k [Bs,HK,n,C,K], v [Bs,HK,n,C,V], g [Bs,HK,n,C,S,K] (any strides),
    w [HK,G,S] mixing weights with the scale folded in. Returns o [Bs,HK,n,G,C,V] (a permuted view of a tensor
    laid out as [Bs,n,C,HK,G,V], or written into ``out_buffer`` of that shape), the final states, and what the
    backward needs."""
    Bs, HK, n, G, C, K = q.shape
    V, S = v.shape[-1], g.shape[-2]
    b = torch.cumsum(g, dim=3, out=q.new_empty(Bs, HK, n, C, S, K))
    bC = b[:, :, :, -1]  # [Bs,HK,n,S,K]
    decay = bC.exp()
    modes = [_choose_mode(b[..., j, :], SUB_CHUNK) for j in range(S)]
    full = [j for j in range(S) if modes[j] == "full"]
    # rhs = [[k e^{-b_s}]_s^T | S_in]: one matmul gives the mixed attention matrix of the weakly decaying states
    # and the inter-chunk output: [w_s q e^{b_s}]_s @ rhs = [A_mix | o_inter]
    rhs = q.new_empty(Bs, HK, n, S * K, C + V)
    Sin = rhs[..., C:].view(Bs, HK, n, S, K, V)
    if full:
        neg = -b
        if len(full) < S:
            neg[..., [j for j in range(S) if j not in full], :] = float("-inf")  # never exp() a large exponent
        kf = rhs[..., :C].transpose(-1, -2).view(Bs, HK, n, C, S, K)
        torch.mul(k.unsqueeze(-2), neg.exp_(), out=kf)
    else:
        rhs[..., :C] = 0.0
        kf = None
    kd = q.new_empty(Bs, HK, n, C, S, K)
    if len(full) == S:
        torch.mul(kf, decay.unsqueeze(3), out=kd)  # k e^{b_C - b}: both factors in range in "full" mode
    else:
        torch.mul(k.unsqueeze(-2), (bC.unsqueeze(3) - b).exp(), out=kd)  # exponents <= 0
    U = (kd.view(Bs, HK, n, C, S * K).transpose(-1, -2) @ v).view(Bs, HK, n, S, K, V)
    finals = _scan(decay, U, h0, layout, Sin=Sin)
    eb = b.exp()
    qe = torch.mul(q.unsqueeze(-2), eb.unsqueeze(3), out=q.new_empty(Bs, HK, n, G, C, S, K))
    wv = w.view(1, HK, 1, G, 1, S, 1)
    qw = qe * wv if store_for_backward else qe.mul_(wv)
    out = qw.view(Bs, HK, n, G * C, S * K) @ rhs  # [Bs,HK,n,G*C,C+V]
    A_mix = out[..., :C]
    A5 = A_mix.unflatten(-2, (G, C))
    intras, As = {}, {}
    for j in range(S):
        if j in full:
            continue
        intra = _Intra(q, k, b[..., j, :], modes[j])
        A = intra.forward()
        A5.add_(A * w[:, :, j].reshape(1, HK, 1, G, 1, 1))
        intras[j], As[j] = intra, A
    A5.masked_fill_(~_causal(C, q.device), 0.0)
    if out_buffer is None:
        out_buffer = torch.empty(Bs, n, C, HK, G, V, dtype=q.dtype, device=q.device)
    o = out_buffer.permute(0, 3, 1, 4, 2, 5)
    torch.add(out[..., C:].unflatten(-2, (G, C)), (A_mix @ v).view(Bs, HK, n, G, C, V), out=o)
    saved = None
    if store_for_backward:
        saved = dict(
            b=b, bC=bC, eb=eb, kd=kd, U=U, decay=decay, Sin=Sin, qe=qe, qw=qw, kf=kf, rhs=rhs, full=full,
            intras=intras, As=As, A_mix=A_mix,
        )  # fmt: skip
    return o, finals, saved


class ChunkDSLAFunction(torch.autograd.Function):
    """q, k, v on the chunk layout; the gates ``g`` [B, T, S, HK, K] as the caller has them, their gradient returned
    contiguous: the gates' own backward (``exp`` in ``LinearGates``) gives bits that depend on the memory order,
    which stays the one it has always been."""

    @staticmethod
    def forward(ctx, q, k, v, g, w, h0, layout):
        o, finals, saved = _chunk_forward(q, k, v, _gate_chunks(g, layout), w, h0, layout, store_for_backward=True)
        ctx.save_for_backward(q, k, v, w)
        ctx.saved = saved
        ctx.layout = layout
        ctx.has_h0 = h0 is not None
        return o, finals

    @staticmethod
    @fp32_compute  # the backward runs under whatever autocast state the caller of .backward() has
    def backward(ctx, do, dfinal):
        q, k, v, w = ctx.saved_tensors
        sv, layout = ctx.saved, ctx.layout
        Bs, HK, n, G, C, K = q.shape
        V, S = v.shape[-1], w.shape[-1]
        if do is None:
            do = q.new_zeros(Bs, HK, n, G, C, V)
        do2 = do.float().contiguous().view(Bs, HK, n, G * C, V)
        qw2 = sv["qw"].view(Bs, HK, n, G * C, S * K)
        # state gradients: this chunk's own contribution, then the reverse scan over chunks
        dSin_local = (qw2.transpose(-1, -2) @ do2).view(Bs, HK, n, S, K, V)
        dSout, dh0 = _reverse_scan(sv["decay"], dSin_local, dfinal, layout)
        Sin, b, full = sv["Sin"], sv["b"], sv["full"]
        dA_mix = (do2 @ v.transpose(-1, -2)).view(Bs, HK, n, G, C, C).masked_fill_(~_causal(C, q.device), 0.0)
        dA2 = dA_mix.view(Bs, HK, n, G * C, C)
        # [dA_mix | do] @ rhs^T = d(qw) of both the intra (factored states) and the inter-chunk term
        dqw = (torch.cat([dA2, do2], dim=-1) @ sv["rhs"].transpose(-1, -2)).view(Bs, HK, n, G, C, S, K)
        qe = sv["qe"]
        dw = (qe * dqw).sum(dim=(0, 2, 4, 6))  # [HK, G, S]
        dqe = dqw.mul_(w.view(1, HK, 1, G, 1, S, 1))
        dq = (dqe * sv["eb"].unsqueeze(3)).sum(-2)  # [Bs,HK,n,G,C,K]
        qdq = (qe * dqe).sum(3)  # [Bs,HK,n,C,S,K]: q . dq of each state, summed over the group
        # state-update term
        dSout2 = dSout.view(Bs, HK, n, S * K, V)
        dkd = (v @ dSout2.transpose(-1, -2)).view(Bs, HK, n, C, S, K)
        kd = sv["kd"]
        kdk = kd * dkd
        dk = (dkd * (sv["bC"].unsqueeze(3) - b).exp()).sum(-2)
        dv = kd.view(Bs, HK, n, C, S * K) @ dSout2 + sv["A_mix"].transpose(-1, -2) @ do2
        if full:
            dkf = (dA2.transpose(-1, -2) @ qw2).view(Bs, HK, n, C, S, K)
            kdk = kdk + sv["kf"] * dkf
            dk = dk + _dk_full(dkf, b, full)
        for j, intra in sv["intras"].items():
            dw[:, :, j] += (sv["As"][j] * dA_mix).sum(dim=(0, 2, 4, 5))
            dqi, dki = intra.backward(dA_mix * w[:, :, j].reshape(1, HK, 1, G, 1, 1))
            dq += dqi
            dk += dki
            qdq[..., j, :] += (q * dqi).sum(3)
            kdk[..., j, :] += k * dki
        db = qdq - kdk
        Sout = torch.addcmul(sv["U"], sv["decay"].unsqueeze(-1), Sin)
        db[:, :, :, -1] += (dSout * Sout).sum(-1)
        dg = layout.from_chunks(db.flip(3).cumsum(3).flip(3).permute(0, 2, 3, 4, 1, 5)).contiguous()  # [B,T,S,HK,K]
        ctx.saved = None
        return dq, dk, dv, dg, dw, (dh0 if ctx.has_h0 else None), None


def _dk_full(dkf, b, full):
    """Key gradient of the factored intra-chunk term: dK_s * e^{-b_s}, for the fully factored states only."""
    S = b.shape[-2]
    neg = -b
    if len(full) < S:
        neg = neg.clone()
        neg[..., [j for j in range(S) if j not in full], :] = float("-inf")
    return (dkf * neg.exp()).sum(-2)


# ----------------------------------------------------------------------------------------------------------------
# public API


def _chunked_keys(x: DSLAInputs, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [Bs,HK,n,C,K] and values [Bs,HK,n,C,V] on the chunk layout: views where the length is a multiple of the
    chunk."""
    kc = layout.to_chunks(x.k.float()).permute(0, 3, 1, 2, 4)
    vc = layout.to_chunks(x.v.float()).permute(0, 3, 1, 2, 4)
    return kc, vc


def _gate_chunks(g: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Gates [B, T, S, HK, K] on the chunk layout, [Bs, HK, n, C, S, K], read in place whatever their strides (only
    their cumulative sum reads them)."""
    return layout.to_chunks(g).permute(0, 4, 1, 2, 3, 5)


@fp32_compute
def chunk_dsla_torch(x: DSLAInputs, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch path of ``chunk_dsla``: autograd through the hand-written backward when a gradient is needed;
    else the forward alone, in blocks of chunks for long inputs."""
    B, T, H, HK, G, K = x.B, x.T, x.H, x.HK, x.G, x.K
    layout = _Layout(B, T, chunk_size, x.cu_seqlens, x.device)
    qc = layout.to_chunks(x.q.float().view(B, T, HK, G, K)).permute(0, 3, 1, 4, 2, 5)
    kc, vc = _chunked_keys(x, layout)
    vc = vc.contiguous()
    g = x.g.float()
    w = x.mix.reshape(HK, G, x.S) * x.scale  # the scale folded into the mixing weights
    h0 = None if x.initial_state is None else x.initial_state.float()
    block = max(1, BLOCK_TOKENS // chunk_size)
    if x.needs_grad:
        oc, final = ChunkDSLAFunction.apply(qc, kc, vc, g, w, h0, layout)
    elif layout.varlen or layout.n <= block:
        oc, final, _ = _chunk_forward(qc, kc, vc, _gate_chunks(g, layout), w, h0, layout, store_for_backward=False)
    else:
        # inference on long inputs: blocks of chunks, so every intermediate stays in cache; states carried over
        Bs, n, C = layout.Bs, layout.n, layout.C
        gc = _gate_chunks(g, layout)
        buffer = qc.new_empty(Bs, n, C, HK, G, x.V)
        final = h0
        for c0 in range(0, n, block):
            c1 = min(n, c0 + block)
            part = (slice(None), slice(None), slice(c0, c1))
            _, final, _ = _chunk_forward(qc[part], kc[part], vc[part], gc[part], w, final, _Block(c1 - c0), False,
                                         out_buffer=buffer[:, c0:c1])  # fmt: skip
        oc = buffer.permute(0, 3, 1, 4, 2, 5)
    # [Bs,HK,n,G,C,V] -> [Bs,n,C,HK,G,V] (the memory order of oc) -> [B,T,H,V]
    Bs, HK, n, G, C, V = oc.shape
    o = layout.from_chunks(oc.permute(0, 2, 4, 1, 3, 5).reshape(Bs, n, C, H, V))
    return o.to(x.q.dtype), (final if x.output_final_state else None)


@fp32_compute
def chunk_states_torch(x: DSLAInputs, chunk_size: int) -> torch.Tensor:
    """Final states only (``fold_kv``'s PyTorch path): per-chunk states by batched matmuls, then the scan over
    chunks."""
    layout = _Layout(x.B, x.T, chunk_size, x.cu_seqlens, x.device)
    kc, vc = _chunked_keys(x, layout)
    Bs, HK, n, C = layout.Bs, x.HK, layout.n, layout.C
    b = _gate_chunks(x.g.float(), layout).cumsum(3)
    bC = b[:, :, :, -1]
    kd = kc.unsqueeze(-2) * (bC.unsqueeze(3) - b).exp()
    U = (kd.reshape(Bs, HK, n, C, x.S * x.K).transpose(-1, -2) @ vc).view(Bs, HK, n, x.S, x.K, x.V)
    h0 = None if x.initial_state is None else x.initial_state.float()
    return _scan(bC.exp(), U, h0, layout)


def chunk_dsla(
    q: torch.Tensor | HedgehogFeatures,
    k: torch.Tensor | HedgehogFeatures,
    v: torch.Tensor,
    g: torch.Tensor | LinearGates,
    mix: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked dual-state linear attention, for prefill and training (the recurrence: :mod:`.inputs`).

    Args:
        q: [B, T, H, K] queries (after the query feature map), or :class:`~.features.HedgehogFeatures` (raw
            queries and the map: the C++ kernel computes the features chunk by chunk, the other backends first).
        k: [B, T, HK, K] keys (after the key feature map), or :class:`~.features.HedgehogFeatures`. ``H`` must be a
            multiple of ``HK``: query head ``h`` reads the states of key/value head ``h // (H // HK)``.
        v: [B, T, HK, V] values.
        g: [B, T, S, HK, K] log decays (<= 0) of each state, ``S = 2`` (DSLA's history and recency states) or 1 (a
            single-state, GLA layer); or :class:`~.gates.LinearGates` giving them by their inputs and weights
            (computed chunk by chunk by the C++ kernel, materialised by the other backends).
        mix: mixing weights of the states, [S] (shared by the heads) or [H, S]; None: ones.
        scale: factor of the queries; None: ``K ** -0.5``.
        initial_state: fp32 [N, S, HK, K, V] states before the first token of each sequence; None: zeros.
        output_final_state: return the states after the last token.
        cu_seqlens: [N + 1] boundaries of packed sequences (``B`` must be 1): sequence ``n`` is tokens
            ``cu_seqlens[n]:cu_seqlens[n + 1]``, read from ``initial_state[n]``; tokens outside every sequence get
            zero outputs. None: each batch row is a sequence (``N = B``).
        chunk_size: tokens per chunk; None: 64 for Triton and for training, 32 for inference on CPUs.
        backend: None picks Triton for CUDA tensors (when importable); on CPUs the fused C++ kernel for inference
            (no gradient needed; where it builds, see :mod:`.cpp_chunk`) and the PyTorch path otherwise.
            ``"torch"``, ``"triton"``, ``"cpp"`` or ``"naive"`` force one.
        out: (inference) a [B, T, H, V] tensor that receives the outputs. It may overlay the queries row for row
            (``out=q``, or ``q[..., :V]``) when nothing reads them after: every backend reads a row of ``q`` before
            it writes that row of ``out``. A long prompt's output then takes no fresh memory, whose page faults cost
            a quarter of the C++ kernel's time at 16k tokens.

    Returns:
        o: [B, T, H, V] outputs in the dtype of ``q`` (``out`` itself when given).
        final_state: fp32 [N, S, HK, K, V] states after the last token, or None without ``output_final_state``.
    """
    x = check_inputs(q, k, v, g, mix, scale, initial_state, output_final_state, cu_seqlens)
    if out is not None:
        _check_out(out, x)
    backend = resolve_backend("chunk", x.v, backend, cpp=not x.needs_grad)
    chunk_size = chunk_size or (CHUNK if backend == "triton" or x.needs_grad else INFERENCE_CHUNK)
    run = implementation("chunk", backend)
    if backend == "cpp":  # computes features and gates given by their inputs itself, and writes into out
        if x.needs_grad:
            raise ValueError("the C++ kernel is forward-only: use backend='torch' (or None) when gradients are needed")
        return run(x, chunk_size, out=out)
    o, final = run(x.materialized(), chunk_size)
    return (o if out is None else out.copy_(o)), final


def _byte_range(x: torch.Tensor) -> tuple[int, int]:
    last = sum((n - 1) * s for n, s in zip(x.shape, x.stride()) if n > 0)
    return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def _check_out(out: torch.Tensor, x: DSLAInputs) -> None:
    """``out`` is a [B, T, H, V] tensor that overlays no input, or overlays ``q`` row for row."""
    if x.needs_grad:
        raise ValueError("out= is for inference: autograd cannot differentiate through an output written in place")
    shape = (x.B, x.T, x.H, x.V)
    if tuple(out.shape) != shape or out.device != x.device:
        raise ValueError(f"out must be a {shape} tensor on {x.device}, got {tuple(out.shape)} on {out.device}")
    if isinstance(x.q, torch.Tensor):  # (features computed from q are among the others)
        q = x.q
        row_for_row = out.data_ptr() == q.data_ptr() and out.stride()[:3] == q.stride()[:3] and out.dtype == q.dtype
        if _overlap(out, q) and not row_for_row:
            raise ValueError("out may overlay q only row for row (out=q, or q[..., :V])")
    if any(_overlap(out, t) for t in x.tensors() if t is not x.q):
        raise ValueError("out overlays an input other than q")
