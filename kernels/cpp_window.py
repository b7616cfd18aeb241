"""The softmax window on CPUs: ``cpp_window.cpp`` (built with the other CPU kernels by :mod:`.cpp_chunk`)."""

from __future__ import annotations

import ctypes

import torch

from .cpp_chunk import fp32_operand, loaded, strides3


def _packed_entry(lib: ctypes.CDLL):
    """``dsla_window_attention_packed`` with its argument types (declared here, beside its only caller)."""
    fn = lib.dsla_window_attention_packed
    if fn.argtypes is None:
        p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        fn.restype = None
        fn.argtypes = [p, p, p, p, p, p, p, n, p, p, n, n, p, p, p, p, n, p, p, i, i, i, i, i, i, i]
    return fn


@torch.no_grad()
def window_attention_cpp(q, keys, values, valid, cos, sin, lin, log_scale, doc_start=None, out=None):
    """The C++ kernel (CPU inference, fp32); same arguments and result as the PyTorch path. `out` (fp32, checked by
    the entry point) receives the result, written row by row after the kernel has read that row of `q`: it may be
    `q` itself."""
    lib = loaded()
    B, T, H, D = q.shape
    W, HK = keys.shape[1] - T, keys.shape[2]
    if out is not None and out.stride(-1) != 1:
        return out.copy_(window_attention_cpp(q, keys, values, valid, cos, sin, lin, log_scale, doc_start))
    q, keys, values, lin = fp32_operand(q), fp32_operand(keys), fp32_operand(values), fp32_operand(lin)
    valid, log_scale = valid.float().contiguous(), log_scale.float().contiguous()
    cos, sin = cos.float().expand(B, -1, -1).contiguous(), sin.float().expand(B, -1, -1).contiguous()
    out = torch.empty(B, T, H, D) if out is None else out
    head = (
        q.data_ptr(), strides3(q), keys.data_ptr(), strides3(keys), values.data_ptr(), strides3(values),
        valid.data_ptr(), valid.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0), cos.stride(1),
        lin.data_ptr(), strides3(lin), log_scale.data_ptr(),
    )  # fmt: skip
    tail = (out.data_ptr(), strides3(out), B, T, W, HK, H // HK, D, torch.get_num_threads())
    if doc_start is None:
        lib.dsla_window_attention(*head, *tail)
    else:
        doc_start = doc_start.to(torch.long).contiguous()
        _packed_entry(lib)(*head, doc_start.data_ptr(), doc_start.stride(0), *tail)
    return out
