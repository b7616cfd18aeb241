"""The fused decoding step on CPUs: ``cpp_decode.cpp`` (built with the chunk kernel by :mod:`.cpp_chunk`)."""

from __future__ import annotations

import ctypes
import weakref

import torch

from .cpp_chunk import FLT_MAX, loaded
from .decode import DecodeWeights


class DecodeLayer(ctypes.Structure):
    """``cpp_decode.cpp``'s ``DecodeLayer``: what every step of a layer reads, passed as one pointer (a step's
    arguments are converted by ctypes one by one, some 0.25 us each on a slow CPU)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("qm", "km", "gw", "gb", "mix", "inv_freq", "log_scale")]
    _fields_ += [(name, ctypes.c_float) for name in ("inv_tau", "clamp", "scale", "rope_scale")]
    _fields_ += [(name, ctypes.c_int) for name in ("mix_heads", "S", "HK", "G", "D", "F")]


_layers: weakref.WeakKeyDictionary[DecodeWeights, tuple[DecodeLayer, int]] = weakref.WeakKeyDictionary()


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def layer_address(weights: DecodeWeights) -> int:
    """The address of the kernel's view of `weights` (a :class:`DecodeLayer`, made once per weights and kept with
    them); its pointers are those of ``weights.fp32``, which the weights hold for as long as the entry lives."""
    entry = _layers.get(weights)
    if entry is None:
        w = weights.fp32
        H, HK, D, F, S = weights.dims
        layer = DecodeLayer(
            qm=_ptr(w.q_map), km=_ptr(w.k_map), gw=_ptr(w.gates_by_key), gb=_ptr(w.gate_bias), mix=_ptr(w.mix),
            inv_freq=_ptr(w.inv_freq), log_scale=_ptr(w.window_log_scale), inv_tau=1.0 / w.tau,
            clamp=-FLT_MAX if w.clamp is None else w.clamp, scale=w.scale, rope_scale=w.rope_scale,
            mix_heads=w.mix is not None and w.mix.dim() == 2, S=S, HK=HK, G=H // HK, D=D, F=F,
        )  # fmt: skip
        entry = _layers[weights] = (layer, ctypes.addressof(layer))
    return entry[1]


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
    keys, values, valid = window if window is not None else (None, None, None)
    if window is not None and not (keys.dtype == values.dtype == valid.dtype == torch.float32):
        raise ValueError("the C++ kernel moves an fp32 window in place")
    layer, dtype = layer_address(weights), q.dtype
    # Every operand is held here until the call returns (a pointer to a temporary would dangle).
    q, k, v = _rows(q), _rows(k), _rows(v)
    mask = None if mask is None else mask.float().contiguous()
    pos = positions
    if pos is not None and not (pos.dtype == torch.long and pos.is_contiguous()):
        pos = pos.to(torch.long).contiguous()
    o = torch.empty(*q.shape)  # (sizes as ints: half the cost of a torch.Size, on a slow CPU)
    lib.dsla_decode_step(  # argument types declared once (cpp_chunk.build)
        layer, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        _ptr(mask), state.data_ptr(), q.shape[0], 0 if keys is None else keys.shape[1], _ptr(keys), _ptr(values),
        _ptr(valid), _ptr(pos), o.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return o if dtype == torch.float32 else o.to(dtype)
