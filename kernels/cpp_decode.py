"""The fused decoding step on CPUs: ``cpp_decode.cpp`` (built with the chunk kernel by :mod:`.cpp_chunk`)."""

from __future__ import annotations

import torch

from .cpp_chunk import FLT_MAX, loaded


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 [B, heads, D] whose heads and features are contiguous (any stride between sequences)."""
    if x.dtype == torch.float32 and x.is_contiguous():  # the projections' views, as a layer passes them
        return x
    x = x.float()
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def cpp_decode_dsla(q, k, v, state, weights, window=None, positions=None, mask=None):
    """:func:`~.decode.fused_decode_dsla` by the C++ kernel (inputs checked there). The window's tensors must be
    fp32 (they are updated in place)."""
    lib = loaded()
    if q.device.type != "cpu":
        raise ValueError("the C++ kernel takes CPU tensors")
    B, H, D = q.shape
    S, HK = state.shape[1], state.shape[2]
    F, dtype = weights.k_map.shape[-1], q.dtype
    keys, values, valid = window if window is not None else (None, None, None)
    if window is not None and not (keys.dtype == values.dtype == valid.dtype == torch.float32):
        raise ValueError("the C++ kernel moves an fp32 window in place")
    w = weights.fp32  # made once per weights
    # Every operand is held here until the call returns (a pointer to a temporary would dangle).
    q, k, v = _rows(q), _rows(k), _rows(v)
    mask = None if mask is None else mask.float().contiguous()
    pos = positions
    if pos is not None and not (pos.dtype == torch.long and pos.is_contiguous()):
        pos = pos.to(torch.long).contiguous()
    clamp = -FLT_MAX if w.clamp is None else w.clamp
    o = torch.empty(B, H, D)
    lib.dsla_decode_step(  # argument types declared once (cpp_chunk.build)
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), _ptr(mask),
        state.data_ptr(), w.q_map.data_ptr(), w.k_map.data_ptr(), w.gate_weight.data_ptr(), w.gate_bias.data_ptr(),
        1.0 / w.tau, clamp, _ptr(w.mix), w.mix is not None and w.mix.dim() == 2, w.scale, B, S, HK, H // HK, D, F,
        0 if keys is None else keys.shape[1], _ptr(keys), _ptr(values), _ptr(valid), _ptr(pos), _ptr(w.inv_freq),
        w.rope_scale, _ptr(w.window_log_scale), o.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return o if dtype == torch.float32 else o.to(dtype)
