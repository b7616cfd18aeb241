"""Dense projections (`dsla_hf.kernels.linear`): oneDNN and MKL agree with `F.linear` (values, gradients, `out=`),
the dispatch rule picks by CPU vendor and instruction set, and the model's projections are swapped in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsla_hf import convert_llama_to_dsla
from dsla_hf.kernels import Linear, dense, linear, onednn_preferred, use_fast_linears

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.fixture(params=["0", "1"] if ONEDNN else ["0"])
def library(request, monkeypatch):
    """Each library `linear` can run: MKL's path ("0") and oneDNN's ("1"), forced."""
    monkeypatch.setenv("DSLA_HF_ONEDNN_LINEAR", request.param)
    monkeypatch.setattr(dense, "ONEDNN_MIN_MACS", 0)  # the small products of these tests too
    onednn_preferred.cache_clear()
    yield request.param
    onednn_preferred.cache_clear()


@pytest.mark.parametrize(
    "shape, bias",
    [((7, 48), True), ((2, 5, 48), False), ((2, 3, 4, 48), True), ((0, 48), True), ((48,), False)],
)
def test_linear_matches_f_linear(library, shape, bias):
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(40, 48)
    b = torch.randn(40) if bias else None
    with torch.no_grad():
        out = linear(x, weight, b)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(9, 96)[:, ::2]  # a view with a stride: both paths take it
    torch.testing.assert_close(linear(strided, weight), F.linear(strided, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", ["all", "input only"])
def test_linear_gradients_match_f_linear(library, trained):
    """Gradients (oneDNN's own backward, or MKL's) equal `F.linear`'s: all three, or the input's alone (a frozen
    projection, as while one DSLA layer trains)."""
    torch.manual_seed(0)
    x, weight, b = torch.randn(2, 6, 32), torch.randn(24, 32), torch.randn(24)
    leaves = (x, weight, b) if trained == "all" else (x,)
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn(2, 6, 24)
    y = linear(x, weight, b)
    assert ("OneDNN" in type(y.grad_fn).__name__) == (library == "1")  # no silent fallback to F.linear
    got = torch.autograd.grad(y, leaves, grad)
    expected = torch.autograd.grad(F.linear(x, weight, b), leaves, grad)
    assert len(got) == len(leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_out_receives_the_result_on_the_mkl_path(library):
    torch.manual_seed(0)
    x, weight, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    out = torch.full((5, 8), float("nan"))
    with torch.no_grad():
        result = linear(x, weight, b, out=out)
    torch.testing.assert_close(result, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    assert (result.data_ptr() == out.data_ptr()) == (library == "0")  # oneDNN's product has no out=


@pytest.mark.parametrize(
    "vendor, isa, kernel_isa, expected, wide",
    [
        ("AuthenticAMD", "avx512", "native", True, True),  # MKL would run its AVX2 code here
        ("HygonGenuine", "avx512", "native", True, True),
        ("AuthenticAMD", "avx512", "avx2", False, True),  # an AVX2 machine's code paths asked for
        ("AuthenticAMD", "avx2", "native", False, True),  # AVX2 code: the layer was slower with oneDNN at 512 and 16k
        ("AuthenticAMD", "other", "native", False, False),
        ("GenuineIntel", "avx512", "native", False, False),  # MKL runs AVX-512 on Intel
        ("GenuineIntel", "avx2", "native", False, False),
    ],
)
def test_dispatch_rule(monkeypatch, vendor, isa, kernel_isa, expected, wide):
    """All products (`onednn_preferred`), and those with wide outputs (an LM head's) where the others keep MKL."""
    monkeypatch.delenv("DSLA_HF_ONEDNN_LINEAR", raising=False)
    monkeypatch.setenv("DSLA_HF_CPU_ISA", kernel_isa)
    monkeypatch.setattr(dense, "cpuinfo", lambda: {"vendor_id": vendor})
    monkeypatch.setattr(dense, "cpu_isa", lambda: isa)
    onednn_preferred.cache_clear()
    try:
        assert onednn_preferred() is (expected and ONEDNN)
        assert dense.onednn_for_wide_outputs() is (wide and ONEDNN)
        for forced in ("0", "1"):  # the override wins either way, for both
            monkeypatch.setenv("DSLA_HF_ONEDNN_LINEAR", forced)
            onednn_preferred.cache_clear()
            assert onednn_preferred() is dense.onednn_for_wide_outputs() is (forced == "1" and ONEDNN)
    finally:
        onednn_preferred.cache_clear()


@pytest.mark.skipif(not ONEDNN, reason="PyTorch without oneDNN")
def test_wide_outputs_alone_take_onednn_on_avx2_code(monkeypatch):
    """On an AVX2-only AMD CPU an LM head's product (outputs >= WIDE_OUTPUTS x inputs) is oneDNN's, a square one
    MKL's, both equal to `F.linear`'s."""
    monkeypatch.delenv("DSLA_HF_ONEDNN_LINEAR", raising=False)
    monkeypatch.delenv("DSLA_HF_CPU_ISA", raising=False)
    monkeypatch.setattr(dense, "cpuinfo", lambda: {"vendor_id": "AuthenticAMD"})
    monkeypatch.setattr(dense, "cpu_isa", lambda: "avx2")
    monkeypatch.setattr(dense, "ONEDNN_MIN_MACS", 0)
    onednn_preferred.cache_clear()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, requires_grad=True)
    try:
        for width, library in ((dense.WIDE_OUTPUTS * 64, "oneDNN"), (64, "MKL")):
            weight = torch.randn(width, 64)
            y = linear(x, weight)
            assert ("OneDNN" in type(y.grad_fn).__name__) == (library == "oneDNN"), library
            torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    finally:
        onednn_preferred.cache_clear()


def test_use_fast_linears_swaps_plain_linears_in_place():
    class Custom(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(4, 3), Custom(3, 2), nn.Sequential(nn.Linear(2, 2)))
    before = {k: v.data_ptr() for k, v in net.state_dict().items()}
    use_fast_linears(net)
    assert [type(m) for m in (net[0], net[1], net[2][0])] == [Linear, Custom, Linear]
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == before  # same keys, same weights


def test_model_projections_run_through_linear(library, tiny_teacher):
    """Every projection of a converted model is a `Linear`, and its logits (DSLA layers active, inference) are those
    of the same model with its projections back on `nn.Linear`."""
    student = convert_llama_to_dsla(tiny_teacher, layers="all", active=[0, 2], dsla_window=4).eval()
    plain = [m for m in student.modules() if isinstance(m, nn.Linear)]
    assert plain and all(type(m) is Linear for m in plain)
    ids = torch.randint(3, 101, (2, 24))
    with torch.no_grad():
        fast = student(ids).logits
        for m in plain:
            m.__class__ = nn.Linear
        reference = student(ids).logits
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not ONEDNN, reason="PyTorch without oneDNN")
def test_small_products_stay_with_mkl(monkeypatch):
    """Under `ONEDNN_MIN_MACS` multiply-adds (a decoding step's attention projections) the product is MKL's."""
    monkeypatch.setenv("DSLA_HF_ONEDNN_LINEAR", "1")
    onednn_preferred.cache_clear()
    try:
        weight = torch.randn(576, 576, requires_grad=True)
        small = linear(torch.randn(1, 576), weight)  # 0.33M multiply-adds
        large = linear(torch.randn(8, 576), weight)  # 2.7M
    finally:
        onednn_preferred.cache_clear()
    assert "OneDNN" not in type(small.grad_fn).__name__
    assert "OneDNN" in type(large.grad_fn).__name__
