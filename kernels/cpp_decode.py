"""The fused decoding step on CPUs: ``cpp_decode.cpp`` (built with the chunk kernel by :mod:`.cpp_chunk`)."""

from __future__ import annotations

import torch

from .cpp_chunk import FLT_MAX, loaded


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 [B, heads, D] whose heads and features are contiguous (any stride between sequences)."""
    x = x.float()
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _fp32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float().contiguous()


@torch.no_grad()
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
    if window is not None and any(t.dtype != torch.float32 for t in window):
        raise ValueError("the C++ kernel moves an fp32 window in place")
    # Every operand is held here until the call returns (a pointer to a temporary would dangle).
    q, k, v = _rows(q), _rows(k), _rows(v)
    mask, mix = _fp32(mask), _fp32(weights.mix)
    q_map, k_map = _fp32(weights.q_map), _fp32(weights.k_map)
    gate_weight, gate_bias = _fp32(weights.gate_weight), _fp32(weights.gate_bias)
    pos = None if positions is None else positions.to(torch.long).contiguous()
    inv_freq, log_scale = _fp32(weights.inv_freq), _fp32(weights.window_log_scale)
    clamp = -FLT_MAX if weights.clamp is None else weights.clamp
    o = torch.empty(B, H, D)
    lib.dsla_decode_step(  # argument types declared once (cpp_chunk.build)
        _ptr(q), q.stride(0), _ptr(k), k.stride(0), _ptr(v), v.stride(0), _ptr(mask), _ptr(state), _ptr(q_map),
        _ptr(k_map), _ptr(gate_weight), _ptr(gate_bias), 1.0 / weights.tau, clamp, _ptr(mix),
        mix is not None and mix.dim() == 2, weights.scale, B, S, HK, H // HK, D, F,
        0 if keys is None else keys.shape[1], _ptr(keys), _ptr(values), _ptr(valid), _ptr(pos), _ptr(inv_freq),
        weights.rope_scale, _ptr(log_scale), _ptr(o), torch.get_num_threads(),
    )  # fmt: skip
    return o.to(dtype)
