"""The softmax window on CPUs: ``cpp_window.cpp`` (built with the other CPU kernels by :mod:`.cpp_chunk`)."""

from __future__ import annotations

import ctypes

import torch

from .cpp_chunk import library


def _strides(x: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_long * 3)(*x.stride()[:3])


@torch.no_grad()
def window_attention_cpp(q, keys, values, valid, cos, sin, lin, log_scale):
    """The C++ kernel (CPU inference, fp32); same arguments and result as the PyTorch path."""
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU kernel is not available on this machine (no compiler, or its build failed)")
    B, T, H, D = q.shape
    W, HK = keys.shape[1] - T, keys.shape[2]

    def rows(x):  # fp32, unit stride in the last dimension
        x = x.float()
        return x if x.stride(-1) == 1 else x.contiguous()

    q, keys, values, lin = rows(q), rows(keys), rows(values), rows(lin)
    valid, log_scale = valid.float().contiguous(), log_scale.float().contiguous()
    cos, sin = cos.float().expand(B, -1, -1).contiguous(), sin.float().expand(B, -1, -1).contiguous()
    out = torch.empty(B, T, H, D)
    lib.dsla_window_attention(
        q.data_ptr(), _strides(q), keys.data_ptr(), _strides(keys), values.data_ptr(), _strides(values),
        valid.data_ptr(), valid.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0), cos.stride(1),
        lin.data_ptr(), _strides(lin), log_scale.data_ptr(), out.data_ptr(), _strides(out), B, T, W, HK, H // HK, D,
        torch.get_num_threads(),
    )  # fmt: skip
    return out
