"""The softmax window of a DSLA layer: exact attention over the newest tokens, sharing a normaliser with the states.

Each of the T new queries (pending index ``W + t``) attends, with RoPE as the teacher does, to the ``W`` newest of
the ``W + T`` pending tokens up to itself (indices ``t + 1 .. t + W``; entries with validity 0 are skipped), and
the states' output ``lin`` (numerator ``[..., :D]``, denominator ``[..., D]``) joins under the same normaliser,
weighted by ``e^{c_h}`` per head:

    o_t = (sum_i e^{s_ti - m} v_i + e^{c_h - m} lin_t[:D]) / (sum_i e^{s_ti - m} + e^{c_h - m} lin_t[D] + 1e-6)

with ``s_ti = rope(q_t) . rope(k_i) / sqrt(D)`` and ``m = max(0, max_i s_ti)`` (the stabiliser cancels; ``>= 0``
keeps both exponentials ``<= 1``). Packed sequences: with ``doc_start`` a query also skips the pending tokens before
its own document's first token, so documents packed in one row never see each other's tokens.

Backends: the PyTorch path (differentiable, any device) and, for CPU inference, the C++ kernel
(``cpp_window.cpp``), which computes it block by block in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import implementation, resolve_backend
from .workspace import scratch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def window_attention_torch(q, keys, values, valid, cos, sin, lin, log_scale, doc_start=None):
    """The PyTorch path: two batched matmuls over bands of 2W (views, no copies), differentiable."""
    B, T, H, D = q.shape
    W, HK = keys.shape[1] - T, keys.shape[2]
    G = H // HK
    scale = D**-0.5  # folded into the queries' rotation
    q = (q * (cos[:, W:, None] * scale) + rotate_half(q) * (sin[:, W:, None] * scale)).float()
    keys = (keys * cos[:, :, None] + rotate_half(keys) * sin[:, :, None]).float()
    # Query block n (queries nW..nW+W-1, pending index W+i) reads pending indices nW .. nW+2W-1: a band of W.
    # Layouts for batched matmuls over (batch, block, KV head), the G query heads of a group as extra rows.
    blocks = -(-T // W)
    pad = (blocks + 1) * W - (W + T)
    q = F.pad(q, (0, 0, 0, 0, 0, blocks * W - T)).view(B, blocks, W, HK, G, D)
    q = q.permute(0, 1, 3, 4, 2, 5).reshape(B, blocks, HK, G * W, D)
    keys = F.pad(keys, (0, 0, 0, 0, 0, pad)).unfold(1, 2 * W, W)  # [B, blocks, HK, D, 2W]: k^T, no copy
    values = F.pad(values.float(), (0, 0, 0, 0, 0, pad)).unfold(1, 2 * W, W).transpose(-1, -2)
    valid = F.pad(valid, (0, pad)).unfold(1, 2 * W, W)  # [B, blocks, 2W]
    r = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None, :]
    allowed = (c > r) & (c <= r + W) & (valid[:, :, None, :] > 0)  # [B, blocks, W, 2W]
    if doc_start is not None:  # column c of block n is pending index nW + c; row r is query nW + r
        first = F.pad(doc_start, (0, blocks * W - T)).view(B, blocks, W, 1)
        index = torch.arange(blocks, device=q.device)[:, None, None] * W + c  # [blocks, 1, 2W]
        allowed &= index >= first
    bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
    # In-place steps only where autograd keeps no copy (matmul and sum outputs, exp's own result).
    scores = (q @ keys).view(B, blocks, HK, G, W, 2 * W).add_(bias[:, :, None, None])
    # The stabiliser cancels between numerator and denominator, so no gradient flows through it.
    top = scores.detach().amax(-1, keepdim=True).clamp_(min=0.0)
    weights = scores.sub_(top).exp_()
    denominator = weights.sum(-1, keepdim=True)  # [B, blocks, HK, G, W, 1]
    numerator = (weights.view(B, blocks, HK, G * W, 2 * W) @ values).view(B, blocks, HK, G, W, D)
    # The states' output in the same layout (a view) and under the same normaliser.
    lin = F.pad(lin.float(), (0, 0, 0, 0, 0, blocks * W - T)).view(B, blocks, W, HK, G, D + 1)
    lin = lin.permute(0, 1, 3, 4, 2, 5)  # [B, blocks, HK, G, W, D + 1]
    lin_scale = torch.exp(log_scale.float().view(HK, G, 1, 1) - top)
    numerator.addcmul_(lin_scale, lin[..., :D])
    denominator.addcmul_(lin_scale, lin[..., D:]).add_(1e-6)
    out = (numerator / denominator).permute(0, 1, 4, 2, 3, 5).reshape(B, blocks * W, H, D)
    return out[:, :T]


def advance_window(
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    window: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    reuse: bool = False,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """T new raw keys and values [B, T, HK, D] (`mask` [B, T]: 0 at padding; None: none) join a window of W (raw
    keys, values, validity [B, W]): of the W + T pending tokens, the T oldest enter the states and the W newest form
    the next window. Returns (what enters the states, the pending tokens, the next window), each (keys, values,
    validity), as views of the pending tokens.

    `reuse` (CPU inference, when nothing reads the pending values after the caller's call): they are written into a
    :func:`.workspace.scratch` tensor, and the next window's values are copied out of it. The keys and validity stay
    fresh: the gates, which a model may record as outputs, keep views of them."""
    B, T = keys.shape[:2]
    new_valid = mask.to(window[2].dtype) if mask is not None else window[2].new_ones(B, T)
    reuse = reuse and values.device.type == "cpu"
    shape = (B, window[1].shape[1] + T, *values.shape[2:])
    out = scratch("dsla_pending_values", shape, values.device, window[1].dtype) if reuse else None
    pending_values = torch.cat([window[1], values], 1, out=out)
    pending = (torch.cat([window[0], keys], 1), pending_values, torch.cat([window[2], new_valid], 1))
    next_values = pending_values[:, T:].clone() if reuse else pending_values[:, T:]
    return tuple(t[:, :T] for t in pending), pending, (pending[0][:, T:], next_values, pending[2][:, T:])


def window_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lin: torch.Tensor,
    log_scale: torch.Tensor,
    backend: str | None = None,
    doc_start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the window beside the states' output (see the module docstring).

    Args:
        q: [B, T, H, D] raw (un-rotated) queries of the T new tokens.
        keys, values: [B, W + T, HK, D] raw pending tokens, the window's W then the new ones.
        valid: [B, W + T], 0 for padding and for the null entries of an empty window.
        cos, sin: [B or 1, W + T, D] RoPE tables of the pending positions (Transformers' rotary embedding).
        lin: [B, T, H, D + 1] the states' output: numerator and denominator.
        log_scale: [H] log weight of the states' share per head.
        backend: None (the C++ kernel for CPU inference where it is the chunk kernel's default, else PyTorch),
            "cpp" or "torch".
        doc_start: [B, T] integers, or None. Packed sequences: the pending index of the first token of each query's
            document (``W`` + its index among the new tokens); the query skips the pending tokens before it.
        out: (inference) an fp32 [B, T, H, D] tensor that receives the result, or None. It may be ``q`` itself when
            nothing reads the queries after: each row of ``q`` is read before that row of ``out`` is written.

    Returns:
        [B, T, H, D] fp32 (``out`` itself when given).
    """
    B, T, H, D = q.shape
    P = keys.shape[1]
    if keys.shape[0] != B or P <= T or keys.shape[-1] != D or H % keys.shape[2] or values.shape != keys.shape:
        raise ValueError(f"pending keys/values [B, W + T, HK, D] do not fit queries {tuple(q.shape)}: "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}")  # fmt: skip
    if valid.shape != (B, P) or cos.shape[-2:] != (P, D) or sin.shape != cos.shape or lin.shape != (B, T, H, D + 1):
        raise ValueError("valid [B, W + T], cos/sin [B, W + T, D] and lin [B, T, H, D + 1] expected")
    if doc_start is not None and (doc_start.shape != (B, T) or doc_start.is_floating_point()):
        raise ValueError(f"doc_start must be an integer tensor of shape {(B, T)}, got {tuple(doc_start.shape)}")
    if out is not None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, values, lin, log_scale)):
            raise ValueError("out= is for inference: autograd cannot differentiate through an output written in place")
        if out.shape != q.shape or out.dtype != torch.float32 or out.device != q.device:
            raise ValueError(f"out must be an fp32 {tuple(q.shape)} tensor on {q.device}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    backend = resolve_backend("window", q, backend, cpp=_cpp_inference(q, keys, values, lin, log_scale))
    run = implementation("window", backend)
    if backend == "cpp":
        return run(q, keys, values, valid, cos, sin, lin, log_scale, doc_start=doc_start, out=out)
    o = run(q, keys, values, valid, cos, sin, lin, log_scale, doc_start=doc_start)
    return o if out is None else out.copy_(o)


def _cpp_inference(*tensors: torch.Tensor) -> bool:
    """CPU fp32 tensors and no gradient needed: where the C++ kernel may run (if it is in use on this machine)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
