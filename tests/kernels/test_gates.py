"""Gates given as inputs and weights (``LinearGates``): the formula, every entry point, and the C++ kernel that
computes them chunk by chunk, against the naive recurrence on materialised gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsla_hf.kernels import LinearGates, chunk_dsla, cpp_chunk, fold_kv, fused_recurrent_dsla, naive_dsla
from dsla_hf.kernels.chunk import SAFE_EXPONENT

from .test_cpp import needs_kernel
from .utils import assert_close, make_inputs


def linear_gates(B, T, HK, K, *, source="key", states=2, D=None, clamp=None, mask=False, strength=1.0, seed=0):
    """Random gates whose inputs sit inside a NaN-filled buffer: a read past the tokens or features poisons the
    output. History gates decay slowly, recency gates fast; ``strength`` scales the weights."""
    gen = torch.Generator().manual_seed(seed)
    D = D or K
    shape = (B, T, HK, D) if source == "key" else (B, T, D)
    buffer = torch.full(tuple(n + 3 for n in shape), float("nan"))
    x = buffer[tuple(slice(0, n) for n in shape)]
    x.copy_(torch.randn(shape, generator=gen))
    weight = torch.randn(states, HK, K, D, generator=gen) * strength / D**0.5
    bias = torch.tensor([4.0, -1.0][:states]).view(states, 1, 1) + 0.5 * torch.randn(states, HK, K, generator=gen)
    keep = (torch.rand(B, T, generator=gen) > 0.3).float() if mask else None
    return LinearGates(x, weight, bias, tau=8.0, clamp=clamp, mask=keep)


def inputs(B, T, H, HK, K, V, gates: LinearGates, seed=1):
    x = make_inputs(B, T, H, HK, K, V, states=gates.num_states, seed=seed, requires_grad=False)
    return dict(x, g=gates)


def reference(x):
    with torch.no_grad():
        return naive_dsla(**dict(x, g=x["g"].materialize()), output_final_state=True)


@pytest.mark.parametrize("source", ["key", "hidden"])
def test_materialize_is_the_formula(source):
    gates = linear_gates(2, 9, 3, 4, source=source, D=5, clamp=-0.3, mask=True, strength=8.0)
    pattern = "bthd,shfd->btshf" if source == "key" else "btd,shfd->btshf"
    u = torch.einsum(pattern, gates.x, gates.weight) + gates.bias
    expected = (F.logsigmoid(u) / gates.tau).clamp(min=-0.3) * gates.mask[:, :, None, None, None]
    torch.testing.assert_close(gates.materialize(), expected, rtol=1e-5, atol=1e-6)
    assert (gates.materialize()[gates.mask == 0] == 0).all()  # padded tokens do not decay


@needs_kernel
@pytest.mark.parametrize("source", ["key", "hidden"])
@pytest.mark.parametrize("states", [2, 1])
@pytest.mark.parametrize("T", [1, 29, 77])
def test_kernel_gates_match_naive(source, states, T, isa):
    """Short last chunks (T not a multiple of 8 or of the chunk) and both kinds of input."""
    gates = linear_gates(2, T, 2, 16, source=source, states=states, D=24 if source == "hidden" else None)
    x = inputs(2, T, 6, 2, 16, 16, gates)
    with torch.no_grad():
        o, final = chunk_dsla(**x, output_final_state=True, backend="cpp")
    o_ref, final_ref = reference(x)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)


@needs_kernel
@pytest.mark.parametrize("K", [5, 16])
@pytest.mark.parametrize("clamp", [None, -0.05])
@pytest.mark.parametrize("mask", [False, True])
def test_kernel_gates_clamp_mask_and_odd_widths(K, clamp, mask):
    """A clamp, a padding mask, and a key width whose padded columns are not a whole vector."""
    gates = linear_gates(1, 70, 3, K, states=1 if K == 5 else 2, clamp=clamp, mask=mask)
    x = inputs(1, 70, 3, 3, K, 7, gates)
    with torch.no_grad():
        o, final = chunk_dsla(**x, output_final_state=True, backend="cpp", chunk_size=16)
    o_ref, final_ref = reference(x)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)


@needs_kernel
@pytest.mark.parametrize("strength", [20.0, 400.0])
def test_kernel_gates_strong_decay(strength, isa):
    """Gates strong enough that chunks take the pairwise path, which recomputes them: finite and right."""
    gates = linear_gates(1, 100, 2, 8, strength=strength)
    x = inputs(1, 100, 4, 2, 8, 8, gates)
    with torch.no_grad():
        o, final = chunk_dsla(**x, output_final_state=True, backend="cpp")
    o_ref, final_ref = reference(x)
    assert gates.materialize().min() * 32 < -SAFE_EXPONENT  # chunks of 32 tokens can exceed the safe exponent
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)


@needs_kernel
def test_kernel_gates_varlen_over_rounds(monkeypatch):
    monkeypatch.setattr(cpp_chunk, "BLOCK_TOKENS", 32)
    cu = torch.tensor([0, 1, 64, 64, 129, 159])
    gates = linear_gates(1, 159, 2, 16, mask=True)
    x = inputs(1, 159, 6, 2, 16, 16, gates)
    x["initial_state"] = torch.randn(5, 2, 2, 16, 16)
    with torch.no_grad():
        o, final = chunk_dsla(**x, output_final_state=True, backend="cpp", cu_seqlens=cu, chunk_size=16)
        o_ref, final_ref = naive_dsla(**x, output_final_state=True, cu_seqlens=cu)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_every_entry_point_takes_linear_gates(backend):
    """chunk_dsla (with gradients on the PyTorch path), fused_recurrent_dsla, fold_kv and naive_dsla give with
    LinearGates what they give with the materialised tensor."""
    gates = linear_gates(2, 20, 2, 8, mask=True)
    weight = gates.weight.clone().requires_grad_()
    gates = LinearGates(gates.x, weight, gates.bias, gates.tau, gates.clamp, gates.mask)
    x = inputs(2, 20, 4, 2, 8, 8, gates)
    g = gates.materialize()
    tensors = dict(x, g=g)
    for fn in (chunk_dsla, fused_recurrent_dsla):
        o, final = fn(**x, output_final_state=True, backend=backend)
        o_ref, final_ref = fn(**tensors, output_final_state=True, backend=backend)
        assert_close("o", o, o_ref, 1e-6)
        assert_close("final_state", final, final_ref, 1e-6)
    o, final = naive_dsla(**x, output_final_state=True)
    o_ref, final_ref = naive_dsla(**tensors, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(final, final_ref)
    if backend == "torch":  # the gradient reaches the gate weights through chunk_dsla's autograd
        o, final = chunk_dsla(**x, output_final_state=True)
        assert o.grad_fn is not None
        (got,) = torch.autograd.grad(o.sum() + final.sum(), [weight])
        o, final = chunk_dsla(**tensors, output_final_state=True)
        (want,) = torch.autograd.grad(o.sum() + final.sum(), [weight])
        assert_close("d weight", got, want, 1e-5)
    folded = fold_kv(x["k"], x["v"], gates, initial_state=x["initial_state"], backend=backend)
    folded_ref = fold_kv(x["k"], x["v"], g, initial_state=x["initial_state"], backend=backend)
    assert_close("folded", folded, folded_ref, 1e-6)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_gates_are_refused(backend):
    """By the entry point, for every backend (the C++ one included, which reads the gates' inputs)."""
    gates = linear_gates(1, 10, 2, 8)
    x = inputs(1, 10, 4, 2, 8, 8, gates)
    wrong = {
        "do not fit": [
            LinearGates(gates.x, gates.weight[:, :1], gates.bias[:, :1], gates.tau),  # heads
            LinearGates(gates.x[:, :5], gates.weight, gates.bias, gates.tau),  # tokens
        ],
        "mask": [LinearGates(gates.x, gates.weight, gates.bias, gates.tau, mask=torch.ones(1, 9))],
        "one or two states": [LinearGates(gates.x, gates.weight.repeat(2, 1, 1, 1), gates.bias.repeat(2, 1, 1), 8.0)],
    }
    with torch.no_grad():
        for message, cases in wrong.items():
            for g in cases:
                with pytest.raises(ValueError, match=message):
                    chunk_dsla(**dict(x, g=g), backend=backend)
