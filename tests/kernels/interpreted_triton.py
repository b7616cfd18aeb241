"""Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors, tiny shapes) against the naive recurrence.

Run by ``test_triton.py`` in a fresh process (Triton reads TRITON_INTERPRET when it is first imported, and importing
``dsla_hf`` may import Triton through Transformers), or directly:
``TRITON_INTERPRET=1 python -m pytest tests/kernels/interpreted_triton.py``.

There is no GPU on the machines these tests run on: this checks the kernels' logic (indexing, masks, sub-chunk
factoring, state carry, in-place update), not their speed or compilation for a real device.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from dsla_hf.kernels import chunk_dsla, fold_kv, fused_recurrent_dsla, naive_dsla  # noqa: E402

from .test_decode import make_step, run_steps  # noqa: E402
from .test_recurrent_fold import nan_empty  # noqa: E402, F401 (a fixture, used by name)
from .utils import assert_close, grads, make_inputs  # noqa: E402

CASES = [
    # B, T, H, HK, K, V, states, gate, varlen
    (2, 40, 4, 2, 8, 8, 2, 0.5, None),
    (1, 37, 2, 2, 16, 20, 2, (1.0, 50.0), None),  # strong decay: -40 per token in the recency state
    (1, 50, 3, 1, 8, 8, 1, 0.5, [0, 5, 33, 50]),
    (1, 17, 4, 2, 33, 65, 2, (1e-4, 1e-3), None),  # odd head dims, near-1 gates
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_kernels_match_naive(case):
    B, T, H, HK, K, V, states, gate, cu = case
    x = make_inputs(B, T, H, HK, K, V, states=states, gate=gate, h0=cu is None, requires_grad=False)
    if cu is not None:
        cu = torch.tensor(cu)
        x["initial_state"] = torch.randn(len(cu) - 1, states, HK, K, V)
    o_ref, final_ref = naive_dsla(**x, output_final_state=True, cu_seqlens=cu)
    o, final = chunk_dsla(**x, output_final_state=True, cu_seqlens=cu, chunk_size=32, backend="triton")
    assert_close("chunk o", o, o_ref, 1e-5)
    assert_close("chunk final", final, final_ref, 1e-5)
    state = fold_kv(x["k"], x["v"], x["g"], x["initial_state"], cu, chunk_size=32, backend="triton")
    assert_close("fold", state, final_ref, 1e-5)
    state = x["initial_state"].clone()
    o, returned = fused_recurrent_dsla(**dict(x, initial_state=state), cu_seqlens=cu, inplace=True, backend="triton")
    assert returned is state
    assert_close("recurrent o", o, o_ref, 1e-5)
    assert_close("recurrent final", state, final_ref, 1e-5)


def test_triton_chained_decode_steps():
    x = make_inputs(2, 6, 4, 2, 8, 8, gate=0.5, requires_grad=False)
    o_ref, final_ref = naive_dsla(**x, output_final_state=True)
    state = x["initial_state"].clone()
    outs = []
    for t in range(6):
        step = {
            k: (v[:, t : t + 1] if k not in ("mix", "initial_state") and v is not None else v) for k, v in x.items()
        }
        outs.append(fused_recurrent_dsla(**dict(step, initial_state=state), inplace=True, backend="triton")[0])
    assert_close("o", torch.cat(outs, 1), o_ref, 1e-5)
    assert_close("final", state, final_ref, 1e-5)


GRAD_CASES = [
    # B, T, H, HK, K, V, states, gate, mix, h0, cu_seqlens, chunk_size
    (2, 40, 4, 2, 8, 8, 2, 0.5, "heads", True, None, 32),  # GQA, T not a multiple of the chunk
    (1, 37, 2, 2, 16, 20, 2, (1.0, 50.0), "heads", True, None, 64),  # strong decay: -40 per token, 3 sub-chunks
    (1, 30, 3, 1, 8, 8, 1, 0.5, "layer", True, [0, 5, 23, 30], 16),  # one state, varlen
    (1, 19, 4, 2, 9, 67, 2, (1e-4, 1e-3), "none", False, None, 32),  # odd head dims, two V blocks, near-1 gates
    (1, 20, 2, 1, 8, 8, 2, (0.0, 1e4), "heads", True, None, 32),  # zero gates and -1e4 per token
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"case{i}" for i in range(len(GRAD_CASES))])
def test_triton_chunk_backward_matches_naive(case):
    B, T, H, HK, K, V, states, gate, mix, h0, cu, chunk_size = case
    x = make_inputs(B, T, H, HK, K, V, states=states, gate=gate, mix=mix, h0=h0 and cu is None)
    if cu is not None:
        cu = torch.tensor(cu)
        x["initial_state"] = torch.randn(len(cu) - 1, states, HK, K, V).requires_grad_()
    o, final, g = grads(lambda **kw: chunk_dsla(**kw, chunk_size=chunk_size, backend="triton"), x, cu_seqlens=cu)
    o_ref, final_ref, g_ref = grads(naive_dsla, x, cu_seqlens=cu)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final", final, final_ref, 1e-5)
    assert set(g) == set(g_ref)
    strong = isinstance(gate, tuple) and gate[1] >= 50
    for name in g_ref:
        if name == "g" and strong:
            # q.dq - k.dk of terms far larger than the result (as in test_chunk): error against the terms' size
            err = (g[name] - g_ref[name]).double().pow(2).mean().sqrt()
            size = (g_ref["k"].double() * x["k"].double()).pow(2).mean().sqrt()
            assert torch.isfinite(g[name]).all(), f"d{name}: inf or nan"
            assert err <= 1e-5 * size, f"d{name}: error {err:.3g} vs term size {size:.3g}"
        else:
            assert_close(f"d{name}", g[name], g_ref[name], 1e-4)


def test_triton_chunk_backward_output_only_and_bf16():
    """No final state asked for (its gradient is None), bf16 inputs: gradients in the inputs' dtype."""
    x = make_inputs(1, 21, 4, 2, 8, 8, gate=0.5, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(1, 21, 4, 8, generator=gen)
    o, final = chunk_dsla(**x, chunk_size=16, backend="triton")
    assert final is None and o.dtype == torch.bfloat16
    names = [n for n, t in x.items() if t is not None]
    g = torch.autograd.grad((o.float() * do).sum(), [x[n] for n in names])
    x32 = {n: (t.detach().float().requires_grad_() if t is not None else None) for n, t in x.items()}
    o_ref, _ = naive_dsla(**x32)
    g_ref = torch.autograd.grad((o_ref * do).sum(), [x32[n] for n in names])
    assert_close("o", o, o_ref, 1e-2)
    for name, a, b in zip(names, g, g_ref):
        assert a.dtype == x[name].dtype, name
        assert_close(f"d{name}", a, b, 1e-2)


@pytest.mark.usefixtures("nan_empty")
def test_triton_chunk_backward_no_uninitialised_reads():
    """torch.empty returns NaN-filled memory: the forward's saved states and every gradient buffer are written
    before they are read (packed sequences, one of them empty, lengths not multiples of the chunk)."""
    assert torch.isnan(torch.empty(3)).all()
    x = make_inputs(1, 26, 2, 1, 8, 8, gate=(0.1, 3.0))
    cu = torch.tensor([0, 7, 7, 26])
    x["initial_state"] = torch.randn(3, 2, 1, 8, 8).requires_grad_()
    o, final, g = grads(lambda **kw: chunk_dsla(**kw, chunk_size=16, backend="triton"), x, cu_seqlens=cu)
    o_ref, final_ref, g_ref = grads(naive_dsla, x, cu_seqlens=cu)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final", final, final_ref, 1e-5)
    for name in g_ref:
        assert_close(f"d{name}", g[name], g_ref[name], 1e-4)


def check_decode(case, o_tol=1e-5, state_tol=1e-5):
    """Six chained steps of the Triton decoding step against the reference: outputs, states and moved windows."""
    o, state, window = run_steps("triton", *case)
    o_ref, state_ref, window_ref = run_steps("naive", *case)
    assert o.dtype == o_ref.dtype
    assert_close("o", o, o_ref, o_tol)
    assert_close("state", state, state_ref, state_tol)
    if window is not None:
        for name, a, b in zip(("keys", "values", "valid"), window, window_ref):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("W", [0, 5])
@pytest.mark.parametrize("S", [2, 1])
@pytest.mark.parametrize(
    "B,H,HK,mix", [(2, 6, 2, "heads"), (3, 4, 4, "layer"), (2, 9, 3, "none"), (1, 10, 1, "heads")]
)
def test_triton_decode_matches_reference(W, S, B, H, HK, mix):
    """Batches, GQA groups of 1 to 10 query heads, every mixing layout, a padded token and a padded window entry."""
    check_decode(make_step(B=B, H=H, HK=HK, S=S, W=W, mask=True, mix=mix))


@pytest.mark.parametrize("W", [0, 5])
def test_triton_decode_odd_head_dim_no_clamp(W):
    """D = 20 and 2F = 12 (masked blocks of 32 and 16), no clamp on the log decays."""
    weights, *rest = make_step(H=9, HK=3, D=20, F_=6, W=W, mask=True)
    check_decode((dataclasses.replace(weights, clamp=None), *rest))


def test_triton_decode_bf16_inputs():
    """bf16 q, k, v (fp32 states and window): computed in fp32 from the same values as the reference, so the states
    agree to fp32 rounding; o in bf16, which the interpreter rounds by truncation (CUDA to nearest): one ulp off."""
    weights, state, window, tokens, masks, positions = make_step(W=5, mask=True)
    tokens = [tuple(t.bfloat16() for t in token) for token in tokens]
    check_decode((weights, state, window, tokens, masks, positions), o_tol=2e-2)
