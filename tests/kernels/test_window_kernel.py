"""The softmax window beside the states: the C++ kernel against the PyTorch path, and the PyTorch path against
softmax attention written out query by query."""

from __future__ import annotations

import pytest
import torch

from dsla_hf.kernels import window_attention
from dsla_hf.kernels.window import rotate_half

from .test_cpp import needs_kernel
from .utils import assert_close


def make_window(B=2, T=45, W=8, H=6, HK=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = W + T
    positions = torch.arange(P, dtype=torch.float32)[None, :, None] + torch.tensor([[[0.0]], [[7.0]]])[:B]
    freqs = positions / 100 ** (torch.arange(0, D, 2) / D).repeat(2)
    valid = torch.ones(B, P)
    valid[0, :3] = 0  # an empty window's null entries
    valid[-1, W + T // 2] = 0  # a padded token
    return dict(
        q=torch.randn(B, T, H, D, generator=gen), keys=torch.randn(B, P, HK, D, generator=gen),
        values=torch.randn(B, P, HK, D, generator=gen), valid=valid, cos=freqs.cos(), sin=freqs.sin(),
        lin=torch.rand(B, T, H, D + 1, generator=gen), log_scale=torch.randn(H, generator=gen),
    )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("T,W", [(45, 8), (1, 8), (5, 64), (70, 64), (33, 1)])
@pytest.mark.parametrize("HK", [2, 6, 1])
def test_cpp_matches_torch(T, W, HK, isa):
    x = make_window(T=T, W=W, HK=HK)
    with torch.no_grad():
        assert_close("o", window_attention(**x, backend="cpp"), window_attention(**x, backend="torch"), 1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_kernel)])
def test_output_may_overlay_the_queries(backend):
    """`out=q`: each block reads its queries before it writes their rows, so the result is that of a fresh output
    (blocks of 32 queries and 3 heads per KV head: several blocks, rows of other heads beside each block's)."""
    x = make_window(T=70, W=16, H=6, HK=2)
    with torch.no_grad():
        want = window_attention(**x, backend=backend)
        q = x["q"].clone()
        got = window_attention(**dict(x, q=q), backend=backend, out=q)
    assert got.data_ptr() == q.data_ptr()
    assert_close("o", got, want, 1e-6)
    with pytest.raises(ValueError, match="out must be"):
        window_attention(**x, out=torch.empty(2, 70, 6, 8))
    with pytest.raises(ValueError, match="inference"):
        window_attention(**dict(x, q=x["q"].requires_grad_()), out=torch.empty_like(x["q"]))


def test_torch_path_is_softmax_over_the_window():
    x = make_window(B=1, T=12, W=4, H=2, HK=1, D=8)
    o = window_attention(**x, backend="torch")
    W, D = 4, 8
    rot = lambda t, i: t * x["cos"][0, i] + rotate_half(t) * x["sin"][0, i]
    for t in range(12):
        for h in range(2):
            seen = [i for i in range(t + 1, t + W + 1) if x["valid"][0, i] > 0]
            scores = torch.stack([rot(x["q"][0, t, h], W + t) @ rot(x["keys"][0, i, 0], i) for i in seen]) / D**0.5
            m = scores.max().clamp(min=0)
            e, c = (scores - m).exp(), (x["log_scale"][h] - m).exp()
            lin = x["lin"][0, t, h]
            want = (e @ x["values"][0, seen, 0] + c * lin[:D]) / (e.sum() + c * lin[D] + 1e-6)
            assert_close(f"t={t} h={h}", o[0, t, h], want, 1e-5)


def test_bad_shapes_are_refused():
    x = make_window()
    with pytest.raises(ValueError, match="pending"):
        window_attention(**dict(x, keys=x["keys"][:, :40]))
    with pytest.raises(ValueError, match="valid"):
        window_attention(**dict(x, valid=x["valid"][:, 1:]))
    with pytest.raises(ValueError, match="unknown backend"):
        window_attention(**x, backend="fast")
