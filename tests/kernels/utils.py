"""Shared helpers of the kernel tests: random inputs and the relative-RMS comparison (fla's ``assert_close``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).pow(2).mean().sqrt() / (expected.pow(2).mean().sqrt() + 1e-30))


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: inf or nan"
    err = rel_rms(actual, expected)
    assert err <= tol, f"{name}: relative RMS error {err:.3g} > {tol:.3g}"


def make_inputs(
    B=1, T=65, H=6, HK=2, K=16, V=16, states=2, gate=1.0, mix="heads", h0=True, dtype=torch.float32, seed=0,
    requires_grad=True,
):  # fmt: skip
    """Random DSLA inputs, the gates ``g`` [B, T, S, HK, K]. ``gate`` scales ``logsigmoid`` of a normal sample: the
    mean log decay per token is about ``-0.8 * gate`` for the history state and 10x that for the recency state (or a
    fixed pair of scales)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    scales = gate if isinstance(gate, tuple) else (gate, gate * 10)
    q, k, v = rnd(B, T, H, K), rnd(B, T, HK, K), rnd(B, T, HK, V)
    g = torch.stack([F.logsigmoid(rnd(B, T, HK, K)) * scales[s] for s in range(states)], dim=2)
    x = dict(
        q=q,
        k=k,
        v=v,
        g=g,
        mix={"none": None, "layer": torch.rand(states, generator=gen), "heads": torch.rand(H, states, generator=gen)}[
            mix
        ],
        initial_state=rnd(B, states, HK, K, V) if h0 else None,
    )
    for name, t in x.items():
        if t is None:
            continue
        t = t.to(dtype) if name != "initial_state" and name != "mix" else t
        x[name] = t.requires_grad_(requires_grad)
    return x


def grads(fn, x, seed=1, **kwargs):
    """Output, final state, and the gradients of a random linear function of both w.r.t. every input tensor."""
    o, final = fn(**x, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen)
    dfinal = torch.randn(final.shape, generator=gen)
    names = [n for n, t in x.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    loss = (o.float() * do).sum() + (final * dfinal).sum()
    gs = torch.autograd.grad(loss, [x[n] for n in names])
    return o, final, dict(zip(names, gs))
