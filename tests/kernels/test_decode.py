"""The fused decoding step: the C++ kernel against the reference step, and the reference against the naive
recurrence and a softmax written out by hand, steps chained so that states and windows carry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dsla_hf.kernels import naive_dsla
from dsla_hf.kernels.decode import DecodeWeights, fused_decode_dsla, hedgehog, rope

from .test_cpp import needs_kernel
from .utils import assert_close


def make_step(B=2, H=6, HK=2, D=16, F_=8, S=2, W=5, seed=0, mask=False, mix="heads"):
    """Weights, a state, a window of W entries (one of them padding) and a stream of 6 new tokens."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    weights = DecodeWeights(
        q_map=rnd(H, D, F_, scale=0.5), k_map=rnd(HK, D, F_, scale=0.5),
        gate_weight=rnd(S, HK, 2 * F_, D, scale=0.3), gate_bias=rnd(S, HK, 2 * F_) + 2.0, tau=4.0, clamp=-0.5,
        mix={"heads": torch.rand(H, S, generator=gen), "layer": torch.rand(S, generator=gen), "none": None}[mix],
        scale=0.7,
        window_log_scale=rnd(H, scale=0.5) if W else None, inv_freq=1.0 / 500 ** (torch.arange(0, D, 2) / D),
        rope_scale=1.1,
    )  # fmt: skip
    state = rnd(B, S, HK, 2 * F_, D + 1).abs()
    window = None
    if W:
        valid = torch.ones(B, W)
        valid[0, 1] = 0.0  # a padded entry
        window = (rnd(B, W, HK, D), rnd(B, W, HK, D), valid)
    tokens = [(rnd(B, H, D), rnd(B, HK, D), rnd(B, HK, D)) for _ in range(6)]
    padded = torch.tensor([1.0, 0.0] + [1.0] * (B - 2))[:B] if B > 1 else torch.zeros(1)
    masks = [padded if mask and i == 2 else None for i in range(6)]
    positions = torch.arange(100, 100 + W + 6).expand(B, -1)
    return weights, state, window, tokens, masks, positions


def run_steps(backend, weights, state, window, tokens, masks, positions):
    state = state.clone()
    window = None if window is None else tuple(t.clone() for t in window)
    W = 0 if window is None else window[0].shape[1]
    outs = []
    for i, ((q, k, v), m) in enumerate(zip(tokens, masks)):
        pos = positions[:, i : i + W + 1] if W else None
        outs.append(fused_decode_dsla(q, k, v, state, weights, window, pos, m, backend=backend))
    return torch.stack(outs, 1), state, window


@needs_kernel
@pytest.mark.parametrize("W", [0, 5])
@pytest.mark.parametrize("S", [2, 1])
@pytest.mark.parametrize(
    "B,H,HK,mix", [(2, 6, 2, "heads"), (3, 4, 4, "layer"), (2, 9, 3, "none"), (1, 10, 1, "heads")]
)
def test_cpp_matches_reference(W, S, B, H, HK, mix, isa):
    """Batches, GQA groups of 1 to 10 query heads (blocks of 4 in the kernel), every mixing layout, padding."""
    case = make_step(B=B, H=H, HK=HK, S=S, W=W, mask=True, mix=mix)
    o, state, window = run_steps("cpp", *case)
    o_ref, state_ref, window_ref = run_steps("naive", *case)
    assert_close("o", o, o_ref, 2e-6)
    assert_close("state", state, state_ref, 2e-6)
    if W:
        for name, a, b in zip(("keys", "values", "valid"), window, window_ref):
            assert torch.equal(a, b), name


@needs_kernel
@pytest.mark.parametrize("W", [0, 12])
def test_cpp_matches_reference_at_smollm2_width(W, isa):
    """SmolLM2's widths (64-wide heads, 64 features a sign, 9 query heads on 3 KV heads): the kernel's register
    blocks of whole vectors, which the small cases above leave to the scalar tails."""
    case = make_step(B=2, H=9, HK=3, D=64, F_=64, S=2, W=W, mask=True)
    o, state, _ = run_steps("cpp", *case)
    o_ref, state_ref, _ = run_steps("naive", *case)
    assert_close("o", o, o_ref, 2e-6)
    assert_close("state", state, state_ref, 2e-6)


@needs_kernel
def test_rope_tables_follow_the_positions(isa):
    """Two layers' steps interleaved, one at positions twice as far apart (RoPE's scores see only distances): the
    kernel's RoPE tables kept from the previous call must be those of each call's own positions."""
    first, second = make_step(B=2, seed=1), make_step(B=2, seed=2)
    second = (*second[:-1], second[-1] * 2)
    runs = {}
    for backend in ("cpp", "naive"):
        states = [(c[1].clone(), tuple(t.clone() for t in c[2])) for c in (first, second)]
        outs = []
        for i in range(6):
            for case, (state, window) in zip((first, second), states):
                weights, _, _, tokens, _, positions = case
                q, k, v = tokens[i]
                outs.append(fused_decode_dsla(q, k, v, state, weights, window, positions[:, i : i + 6], None,
                                              backend=backend))  # fmt: skip
        runs[backend] = torch.stack(outs)
    assert_close("o", runs["cpp"], runs["naive"], 2e-6)


def test_reference_states_are_the_recurrence():
    """With no window, the reference's states after a few steps are the naive recurrence run on the Hedgehog
    features, log-sigmoid gates and [v, 1] values it describes, and its outputs that recurrence's normalised."""
    weights, state, _, tokens, _, _ = make_step(W=0)
    o, final, _ = run_steps("naive", weights, state, None, tokens, [None] * 6, None)
    q = torch.stack([t[0] for t in tokens], 1)
    k = torch.stack([t[1] for t in tokens], 1)
    v = torch.stack([t[2] for t in tokens], 1)
    B, T, HK, D = k.shape
    phi = hedgehog(k.flatten(0, 1), weights.k_map).view(B, T, HK, -1)
    psi = hedgehog(q.flatten(0, 1), weights.q_map).view(B, T, q.shape[2], -1)
    u = torch.einsum("shfd,bthd->btshf", weights.gate_weight, k) + weights.gate_bias
    g = (F.logsigmoid(u) / weights.tau).clamp(min=weights.clamp)
    values = torch.cat([v, torch.ones(B, T, HK, 1)], -1)
    lin, final_ref = naive_dsla(psi, phi, values, g, weights.mix, weights.scale, state, True)
    assert_close("state", final, final_ref, 1e-6)
    assert_close("o", o, lin[..., :D] / (lin[..., D:] + 1e-6), 1e-6)


def test_reference_window_is_softmax_attention():
    """With the states' share switched off (log scale -inf... here -80), the windowed output is softmax attention
    with RoPE over the last W tokens, written out by hand."""
    weights, state, window, tokens, _, positions = make_step(B=1, W=5)
    weights = dataclasses.replace(weights, window_log_scale=torch.full((6,), -80.0))
    window = (window[0], window[1], torch.ones(1, 5))
    o, _, _ = run_steps("naive", weights, state, window, tokens[:1], [None], positions)
    q, k, v = tokens[0]
    keys = torch.cat([window[0][:, 1:], k[:, None]], 1)  # the W newest: the window moved by one
    values = torch.cat([window[1][:, 1:], v[:, None]], 1)
    qr = rope(q[:, None], positions[:, 5:6], weights.inv_freq, weights.rope_scale)[:, 0]
    kr = rope(keys, positions[:, 1:6], weights.inv_freq, weights.rope_scale)
    for h in range(6):
        scores = kr[0, :, h // 3] @ qr[0, h] / 16**0.5
        want = scores.softmax(0) @ values[0, :, h // 3]
        assert_close(f"head {h}", o[0, 0, h], want, 1e-5)


def test_bad_inputs_are_refused():
    weights, state, window, tokens, _, positions = make_step(W=5)
    q, k, v = tokens[0]
    pos = positions[:, :6]
    with pytest.raises(ValueError, match="state must be"):
        fused_decode_dsla(q, k, v, state.double(), weights, window, pos, backend="naive")
    with pytest.raises(ValueError, match="positions"):
        fused_decode_dsla(q, k, v, state, weights, window, None, backend="naive")
    with pytest.raises(ValueError, match="query heads"):
        fused_decode_dsla(q[:, :5], k, v, state, weights, window, pos, backend="naive")
    with pytest.raises(ValueError, match="contiguous"):
        fused_decode_dsla(q, k, v, state, weights, (window[0].transpose(0, 1).contiguous().transpose(0, 1),
                          *window[1:]), pos, backend="naive")  # fmt: skip
    with pytest.raises(ValueError, match="unknown backend"):
        fused_decode_dsla(q, k, v, state, weights, window, pos, backend="fast")
    # the weights are checked once, when made
    with pytest.raises(ValueError, match="feature maps"):
        dataclasses.replace(weights, k_map=weights.k_map[:, :, :4])
    with pytest.raises(ValueError, match="gates"):
        dataclasses.replace(weights, gate_bias=weights.gate_bias[:, :1])
    with pytest.raises(ValueError, match="mix"):
        dataclasses.replace(weights, mix=torch.ones(3))
    with pytest.raises(ValueError, match="inv_freq"):
        dataclasses.replace(weights, inv_freq=weights.inv_freq[:3])
