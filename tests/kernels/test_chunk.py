"""chunk_dsla (PyTorch path) against the naive fp32 recurrence: outputs, final states and every gradient. (Calls
that need gradients take the PyTorch path; no-grad calls name it. The C++ kernel has its own tests.)"""

from __future__ import annotations

import pytest
import torch

from dsla_hf.kernels import chunk_dsla, fused_recurrent_dsla, naive_dsla
from dsla_hf.kernels.chunk import SAFE_EXPONENT, _choose_mode

from .utils import assert_close, grads, make_inputs

SHAPES = [
    # B, T, H, HK, K, V
    (2, 1, 6, 2, 16, 16),
    (1, 63, 6, 2, 16, 16),
    (2, 65, 4, 4, 33, 33),
    (1, 200, 6, 2, 16, 65),
    (1, 128, 3, 1, 8, 12),
]


def check_against_naive(x, tol=1e-4, gate_tol=None, **kwargs):
    o, final, g = grads(chunk_dsla, x, **kwargs)
    o_ref, final_ref, g_ref = grads(naive_dsla, x)
    assert_close("o", o, o_ref, tol)
    assert_close("final_state", final, final_ref, tol)
    for name in g_ref:
        if name == "g" and gate_tol is not None:
            # d/dg = q.dq - k.dk (+ state terms): a difference of terms much larger than the result when the decay
            # is so strong that the result is ~0, so measure its error against the size of those terms
            err = (g[name] - g_ref[name]).double().pow(2).mean().sqrt()
            size = (g_ref["k"].double() * x["k"].double()).pow(2).mean().sqrt()
            assert torch.isfinite(g[name]).all(), f"d{name}: inf or nan"
            assert err <= gate_tol * size, f"d{name}: error {err:.3g} vs term size {size:.3g}"
        else:
            assert_close(f"d{name}", g[name], g_ref[name], tol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}HK{}K{}V{}".format(*s))
@pytest.mark.parametrize("states", [2, 1])
def test_chunk_matches_naive(shape, states):
    B, T, H, HK, K, V = shape
    x = make_inputs(B, T, H, HK, K, V, states=states, gate=0.2)
    check_against_naive(x)


@pytest.mark.parametrize("mix", ["none", "layer", "heads"])
@pytest.mark.parametrize("h0", [True, False])
def test_mix_and_initial_state(mix, h0):
    x = make_inputs(2, 70, 6, 2, 16, 16, mix=mix, h0=h0, gate=0.5)
    check_against_naive(x)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes(chunk_size):
    check_against_naive(make_inputs(1, 100, 6, 2, 16, 16, gate=0.3), chunk_size=chunk_size)


@pytest.mark.parametrize(
    "gate,mode",
    [
        ((1e-3, 1e-3), "full"),  # ~ -1e-3 per token: the history gate near 1
        ((0.1, 0.5), "full"),
        ((0.1, 2.0), "sub"),  # recency state ~ -1.6/token: a chunk decays by ~e^-100, a sub-chunk by ~e^-26
        ((0.1, 8.0), "exact"),  # ~ -5.5/token: a sub-chunk alone decays by e^-90
        ((1.0, 100.0), "exact"),  # ~ -70/token
    ],
)
def test_strong_and_weak_decay(gate, mode):
    x = make_inputs(1, 130, 6, 2, 16, 16, gate=gate)
    b = x["g"].detach()[:, :128, 1].reshape(1, 2, 64, 2, 16).cumsum(2).permute(0, 3, 1, 2, 4)  # [B, HK, n, C, K]
    assert _choose_mode(b, 16) == mode  # the recency state takes the intended path
    check_against_naive(x, gate_tol=1e-5)


def test_exact_mode_survives_extreme_gates():
    """Decays far beyond fp32's exponent range (-1e4 per token) and exactly zero gates: finite, and right."""
    x = make_inputs(1, 90, 4, 2, 8, 8, gate=(0.0, 1e4))
    check_against_naive(x, gate_tol=1e-5)


def test_mode_selection():
    C, K = 64, 4
    weak = torch.full((1, 1, 1, C, K), -0.01).cumsum(-2)
    mid = torch.full((1, 1, 1, C, K), -2.0).cumsum(-2)
    strong = torch.full((1, 1, 1, C, K), -5.0).cumsum(-2)
    assert _choose_mode(weak, 16) == "full"
    assert _choose_mode(mid, 16) == "sub" and 16 * 2.0 <= SAFE_EXPONENT < 64 * 2.0
    assert _choose_mode(strong, 16) == "exact"


def test_bf16_inputs():
    x = make_inputs(1, 100, 6, 2, 16, 16, gate=0.5, dtype=torch.bfloat16)
    o, final, g = grads(chunk_dsla, x)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    x32 = {n: (t.detach().float().requires_grad_() if t is not None else None) for n, t in x.items()}
    o_ref, final_ref, g_ref = grads(naive_dsla, x32)
    assert_close("o", o, o_ref, 1e-2)
    assert_close("final_state", final, final_ref, 1e-4)
    for name in g_ref:
        assert g[name].dtype == x[name].dtype
        assert_close(f"d{name}", g[name], g_ref[name], 1e-2)


def test_autocast_leaves_the_kernels_in_fp32():
    """Under CPU bf16 autocast (mixed-precision training) the PyTorch kernels compute exactly as without it, forward
    and backward (the backward runs outside the forward's autocast context, as in a training loop)."""
    x = make_inputs(2, 100, 6, 2, 16, 16, gate=0.5)
    o_ref, final_ref, g_ref = grads(chunk_dsla, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, final = chunk_dsla(**x, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    names = list(g_ref)
    g = dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names])))
    assert o.dtype == torch.float32 and torch.equal(o, o_ref) and torch.equal(final, final_ref)
    for name in names:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-6, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (fused_recurrent_dsla, naive_dsla):
            o_fn, final_fn = fn(**x, output_final_state=True)
            assert o_fn.dtype == torch.float32
            assert_close(fn.__name__, o_fn, o_ref, 1e-5)
            assert_close(fn.__name__ + " state", final_fn, final_ref, 1e-5)


def test_bf16_strong_decay_is_finite():
    x = make_inputs(1, 100, 6, 2, 16, 16, gate=(1.0, 50.0), dtype=torch.bfloat16)
    o, final, g = grads(chunk_dsla, x)
    assert torch.isfinite(o.float()).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(t.float()).all() for t in g.values())


@pytest.mark.parametrize("states", [2, 1])
def test_varlen_matches_per_sequence(states):
    lengths = [1, 63, 65, 30]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = int(cu[-1])
    x = make_inputs(1, T, 6, 2, 16, 16, states=states, gate=0.5, h0=False)
    x["initial_state"] = torch.randn(len(lengths), states, 2, 16, 16).requires_grad_()
    o, final, g = grads(chunk_dsla, x, cu_seqlens=cu)
    # reference: each sequence alone through the naive recurrence
    outs, finals = [], []
    for n in range(len(lengths)):
        s, e = int(cu[n]), int(cu[n + 1])
        part = {k: (t[:, s:e] if k not in ("mix", "initial_state") and t is not None else t) for k, t in x.items()}
        part["initial_state"] = x["initial_state"][n : n + 1]
        o_n, f_n = naive_dsla(**part, output_final_state=True)
        outs.append(o_n)
        finals.append(f_n)
    o_ref, final_ref = torch.cat(outs, 1), torch.cat(finals)
    gen = torch.Generator().manual_seed(1)
    loss = (o_ref * torch.randn(o_ref.shape, generator=gen)).sum()
    loss = loss + (final_ref * torch.randn(final_ref.shape, generator=gen)).sum()
    g_ref = dict(zip(g, torch.autograd.grad(loss, [x[n] for n in g])))
    assert_close("o", o, o_ref, 1e-4)
    assert_close("final_state", final, final_ref, 1e-4)
    for name in g:
        assert_close(f"d{name}", g[name], g_ref[name], 1e-4)


def test_varlen_with_tokens_outside_every_sequence():
    """Packed sequences that leave tokens before the first and after the last: their outputs are zeros and their
    gradients too, as in the naive recurrence (the output keeps the batch's length)."""
    cu = torch.tensor([2, 40, 41, 77])
    x = make_inputs(1, 90, 6, 2, 16, 16, gate=0.5, h0=False)
    o, final, g = grads(chunk_dsla, x, cu_seqlens=cu, backend="torch")
    o_ref, final_ref, g_ref = grads(naive_dsla, x, cu_seqlens=cu)
    assert o.shape == (1, 90, 6, 16) and (o[:, :2] == 0).all() and (o[:, 77:] == 0).all()
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
    for name in g:
        assert_close(f"d{name}", g[name], g_ref[name], 1e-5)


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_blocked_inference_path(chunk_size):
    """Long inputs without autograd run in blocks of chunks with the states carried across blocks (the default
    inference chunk, and 64)."""
    x = make_inputs(2, 1100, 3, 1, 8, 8, gate=0.05, requires_grad=False)
    with torch.no_grad():
        o, final = chunk_dsla(**x, output_final_state=True, chunk_size=chunk_size, backend="torch")
        o_ref, final_ref = naive_dsla(**x, output_final_state=True)
    assert_close("o", o, o_ref, 1e-4)
    assert_close("final_state", final, final_ref, 1e-4)


def test_no_grad_matches_autograd_path():
    x = make_inputs(1, 150, 6, 2, 16, 16, gate=0.5)
    o1, f1 = chunk_dsla(**x, output_final_state=True)
    with torch.no_grad():
        o2, f2 = chunk_dsla(**x, output_final_state=True)
    assert_close("o", o2, o1.detach(), 1e-6)
    assert_close("final_state", f2, f1.detach(), 1e-6)


def test_errors_and_backends():
    x = make_inputs(1, 10, 6, 2, 8, 8, requires_grad=False)
    with pytest.raises(ValueError):
        chunk_dsla(**x, backend="cuda-magic")
    bad = dict(x, q=torch.randn(1, 10, 5, 8))
    with pytest.raises(ValueError):
        chunk_dsla(**bad)
    o_naive, _ = chunk_dsla(**x, backend="naive")
    o_torch, _ = chunk_dsla(**x, backend="torch")
    assert_close("o", o_torch, o_naive, 1e-5)
