"""The fused C++ CPU kernel (inference) against the naive fp32 recurrence, its build and its dispatch."""

from __future__ import annotations

import shutil

import pytest
import torch

from dsla_hf.kernels import chunk_dsla, cpp_chunk, dispatch, naive_dsla
from dsla_hf.kernels.dispatch import resolve_backend

from .test_chunk import SHAPES
from .utils import assert_close, make_inputs

HAS_COMPILER = shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")


def check(x, tol=1e-5, **kwargs):
    with torch.no_grad():
        o, final = chunk_dsla(**x, output_final_state=True, backend="cpp", **kwargs)
        o_ref, final_ref = naive_dsla(**x, output_final_state=True, cu_seqlens=kwargs.get("cu_seqlens"))
    assert o.dtype == x["q"].dtype and final.dtype == torch.float32
    assert_close("o", o, o_ref, tol)
    assert_close("final_state", final, final_ref, tol)


def test_the_kernel_builds_where_there_is_a_compiler():
    """On a machine with g++ (CI's), the kernel must build: a broken build would silently fall back otherwise."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine")
    assert cpp_chunk.available()


@needs_kernel
def test_loading_the_kernel_keeps_denormals(monkeypatch, tmp_path):
    """Linked with -ffast-math, the library would flush fp32 denormals to zero for the whole process on load."""
    monkeypatch.setenv("DSLA_HF_CACHE", str(tmp_path))
    cpp_chunk.build.cache_clear()
    try:
        assert cpp_chunk.library() is not None  # a fresh build, loaded
        assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
    finally:
        monkeypatch.undo()
        cpp_chunk.build.cache_clear()


@needs_kernel
def test_kernels_leave_denormals_to_the_caller():
    """The kernels flush denormals inside their parallel regions (five times faster on real activations), and give
    the calling thread its own floating-point mode back: denormal results of later PyTorch work are kept."""
    x = make_inputs(1, 40, 6, 2, 16, 16, gate=0.5, requires_grad=False)
    tiny = torch.tensor([1e-39])
    with torch.no_grad():
        chunk_dsla(**x, backend="cpp")
    assert (tiny * 1.0).item() != 0.0 and (tiny / 2).item() != 0.0


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}HK{}K{}V{}".format(*s))
@pytest.mark.parametrize("states", [2, 1])
def test_matches_naive(shape, states, isa):
    check(make_inputs(*shape, states=states, gate=0.2, requires_grad=False))


@needs_kernel
@pytest.mark.parametrize("mix", ["none", "layer", "heads"])
@pytest.mark.parametrize("h0", [True, False])
def test_mix_and_initial_state(mix, h0, isa):
    check(make_inputs(2, 70, 6, 2, 16, 16, mix=mix, h0=h0, gate=0.5, requires_grad=False))


@needs_kernel
@pytest.mark.parametrize("chunk_size", [8, 16, 24, 32, 64])
def test_chunk_sizes(chunk_size):
    check(make_inputs(1, 100, 6, 2, 16, 16, gate=0.3, requires_grad=False), chunk_size=chunk_size)


@needs_kernel
@pytest.mark.parametrize("gate", [(1e-3, 1e-3), (0.1, 2.0), (0.1, 8.0), (1.0, 100.0), (0.0, 1e4)])
def test_strong_and_weak_decay(gate, isa):
    """Chunks whose exponents exceed SAFE_EXPONENT take the pairwise path: finite and right, to gates far beyond
    fp32's exponent range."""
    check(make_inputs(1, 130, 6, 2, 16, 16, gate=gate, requires_grad=False))


@needs_kernel
def test_rounds_carry_the_states(monkeypatch):
    """Inputs longer than one round of chunks (BLOCK_TOKENS) carry the states from round to round."""
    monkeypatch.setattr(cpp_chunk, "BLOCK_TOKENS", 64)
    check(make_inputs(2, 300, 3, 1, 8, 8, gate=0.05, requires_grad=False), chunk_size=16)


@needs_kernel
@pytest.mark.parametrize("states", [2, 1])
def test_varlen_matches_naive(states, monkeypatch, isa):
    """Packed sequences, an empty one among them (its state passes through), over several rounds."""
    monkeypatch.setattr(cpp_chunk, "BLOCK_TOKENS", 32)
    cu = torch.tensor([0, 1, 64, 64, 129, 159])
    x = make_inputs(1, 159, 6, 2, 16, 16, states=states, gate=0.5, h0=False, requires_grad=False)
    x["initial_state"] = torch.randn(5, states, 2, 16, 16)
    check(x, cu_seqlens=cu, chunk_size=16)


@needs_kernel
def test_strided_and_bf16_inputs():
    """Gates and queries in head-major memory (as the model's materialised gates are) are read in place; bf16 inputs
    give bf16 outputs and fp32 states."""
    x = make_inputs(2, 90, 6, 2, 16, 16, gate=0.5, requires_grad=False)
    g = x["g"].permute(3, 0, 1, 2, 4).contiguous().permute(1, 2, 3, 0, 4)  # same values, head-major memory
    q = x["q"].transpose(1, 2).contiguous().transpose(1, 2)
    strided = dict(x, g=g, q=q)
    assert not strided["g"].is_contiguous() and not strided["q"].is_contiguous()
    check(strided)
    half = make_inputs(1, 100, 6, 2, 16, 16, gate=0.5, dtype=torch.bfloat16, requires_grad=False)
    with torch.no_grad():
        o, final = chunk_dsla(**half, output_final_state=True, backend="cpp")
        as32 = {n: (t.float() if t is not None else None) for n, t in half.items()}
        o_ref, final_ref = naive_dsla(**as32, output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close("o", o, o_ref, 1e-2)
    assert_close("final_state", final, final_ref, 1e-5)


@needs_kernel
def test_dispatch():
    """CPU inference uses the kernel by default; anything that needs gradients keeps the PyTorch path, and the
    kernel refuses it when forced. DSLA_HF_CPP_KERNEL=0 turns it off."""
    x = make_inputs(1, 40, 6, 2, 16, 16, gate=0.5)
    assert resolve_backend("chunk", x["q"], None, cpp=True) == "cpp"
    o, _ = chunk_dsla(**x)
    assert o.grad_fn is not None  # the autograd path
    with torch.no_grad():
        o_default, _ = chunk_dsla(**x)
        o_cpp, _ = chunk_dsla(**x, backend="cpp")
    assert torch.equal(o_default, o_cpp)
    with pytest.raises(ValueError, match="forward-only"):
        chunk_dsla(**x, backend="cpp")
    with pytest.raises(ValueError, match="initial_state"), torch.no_grad():
        chunk_dsla(**dict(x, initial_state=torch.zeros(3, 2, 2, 16, 16)), backend="cpp")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DSLA_HF_CPP_KERNEL", "0")
    assert resolve_backend("chunk", torch.zeros(1), None, cpp=True) == "torch"


@needs_kernel
def test_dispatch_rule_by_cpu(monkeypatch):
    """Unset, the kernel is the default on CPUs with AVX2 and FMA only (where it was measured faster than the
    PyTorch path); DSLA_HF_CPP_KERNEL=1 turns it on anywhere."""
    monkeypatch.delenv("DSLA_HF_CPP_KERNEL", raising=False)
    for flags, want in [({"avx2", "fma", "sse2"}, "cpp"), ({"avx2", "fma", "avx512f"}, "cpp"), ({"sse2"}, "torch"),
                        (set(), "torch")]:  # fmt: skip
        monkeypatch.setattr(dispatch, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert resolve_backend("chunk", torch.zeros(1), None, cpp=True) == want, flags
    monkeypatch.setenv("DSLA_HF_CPP_KERNEL", "1")
    assert resolve_backend("chunk", torch.zeros(1), None, cpp=True) == "cpp"


def test_isa_choice(monkeypatch):
    """DSLA_HF_CPU_ISA names a code path; an unknown one, or one this CPU cannot run, is refused before any build."""
    monkeypatch.setenv("DSLA_HF_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="choose one of"):
        cpp_chunk.isa()
    monkeypatch.setattr(cpp_chunk, "cpu_isa", lambda: "avx2")
    monkeypatch.setenv("DSLA_HF_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="lacks"):
        cpp_chunk.library()
    monkeypatch.setenv("DSLA_HF_CPU_ISA", "native")
    assert cpp_chunk.vector_isa() == "avx2"
    monkeypatch.setattr(cpp_chunk, "cpu_isa", lambda: "other")
    assert cpp_chunk.vector_isa() == "generic"


def test_native_builds_for_avx2_cpus_keep_256_bit_loops(monkeypatch):
    # GCC's own tuning for AVX2-era AMD cores would vectorise the plain loops at 128 bits (slower, measured).
    monkeypatch.setattr(cpp_chunk, "cpu_isa", lambda: "avx2")
    assert cpp_chunk.compile_flags("native")[-2:] == ("-march=native", "-mtune=generic")
    assert "-mtune=generic" not in cpp_chunk.compile_flags("avx2")  # x86-64-v3 is generic already
    monkeypatch.setattr(cpp_chunk, "cpu_isa", lambda: "avx512")
    assert cpp_chunk.compile_flags("native")[-1] == "-march=native"


def test_build_into_a_fresh_cache_and_failure_falls_back(monkeypatch, tmp_path):
    """A fresh cache folder gets the library; a compiler that fails gives one warning and the PyTorch path."""
    monkeypatch.setenv("DSLA_HF_CACHE", str(tmp_path))
    try:
        if HAS_COMPILER:
            cpp_chunk.build.cache_clear()
            assert cpp_chunk.library() is not None
            assert len(list((tmp_path / "kernels").glob("cpp_chunk-*.so"))) == 1
        monkeypatch.setenv("CXX", "false")  # exists, exits 1
        monkeypatch.setenv("DSLA_HF_CACHE", str(tmp_path / "other"))
        cpp_chunk.build.cache_clear()
        with pytest.warns(UserWarning, match="could not be built"):
            assert cpp_chunk.library() is None
        assert resolve_backend("chunk", torch.zeros(1), None, cpp=True) == "torch"
        x = make_inputs(1, 20, 6, 2, 16, 16, requires_grad=False)
        with torch.no_grad():
            assert_close("o", chunk_dsla(**x)[0], naive_dsla(**x)[0], 1e-5)
    finally:
        monkeypatch.undo()
        cpp_chunk.build.cache_clear()


@pytest.mark.parametrize("backend", ["cpp", "torch", "naive"])
def test_output_may_overlay_the_queries(backend):
    """out=q (and out=q[..., :V] with fewer value than key features) gives the outputs of a fresh tensor, written
    where the queries were, packed sequences included."""
    if backend == "cpp" and not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine")
    for K, V, cu in [(16, 16, None), (16, 12, None), (16, 16, torch.tensor([0, 40, 41, 90]))]:
        x = make_inputs(1, 90, 6, 2, K, V, gate=0.5, requires_grad=False)
        if cu is not None:
            x["initial_state"] = x["initial_state"].expand(3, -1, -1, -1, -1).contiguous()
        with torch.no_grad():
            want, final_want = chunk_dsla(**x, output_final_state=True, backend=backend, cu_seqlens=cu)
            q = x["q"].clone()
            out = q[..., :V]
            o, final = chunk_dsla(**dict(x, q=q), output_final_state=True, backend=backend, cu_seqlens=cu, out=out)
        assert o.data_ptr() == q.data_ptr()
        assert_close("o", o, want, 1e-6)
        assert_close("final_state", final, final_want, 1e-6)


def test_bad_outputs_are_refused():
    x = make_inputs(1, 20, 4, 2, 8, 8, gate=0.5, requires_grad=False)
    shifted = torch.empty(1, 21, 4, 8)  # q in tokens 0..19, out in tokens 1..20
    shifted[:, :20] = x["q"]
    with torch.no_grad():
        with pytest.raises(ValueError, match="must be a"):
            chunk_dsla(**x, out=torch.empty(1, 20, 4, 7))
        with pytest.raises(ValueError, match="row for row"):
            chunk_dsla(**dict(x, q=shifted[:, :20]), out=shifted[:, 1:])
        out = torch.empty(1, 20, 4, 8)
        with pytest.raises(ValueError, match="other than q"):
            chunk_dsla(**dict(x, k=out[:, :, :2]), out=out)
    with pytest.raises(ValueError, match="inference"):
        chunk_dsla(**make_inputs(1, 20, 4, 2, 8, 8), out=torch.empty(1, 20, 4, 8))


@needs_kernel
@pytest.mark.parametrize("case", ["plain", "pairwise", "rounds", "varlen"])
def test_a_column_of_ones_is_summed_apart(case, monkeypatch, isa):
    """Values whose last column is ones (the sum normaliser's) take the kernel's separate sums: outputs and final
    states (that column included) match the naive recurrence, through initial states, strongly decaying states
    (the pairwise path), rounds and packed sequences."""
    monkeypatch.setattr(cpp_chunk, "BLOCK_TOKENS", 32)
    gate = (0.0, 1e4) if case == "pairwise" else 0.5
    T, B = (159, 1) if case == "varlen" else (100, 2)
    x = make_inputs(B, T, 6, 2, 16, 17, gate=gate, requires_grad=False)
    x["v"][..., -1] = 1.0
    assert cpp_chunk.ones_column(x["v"]) and not cpp_chunk.ones_column(x["v"][..., :-1])
    if case == "varlen":
        x["initial_state"] = torch.randn(5, 2, 2, 16, 17)
        check(x, cu_seqlens=torch.tensor([0, 1, 64, 64, 129, 159]), chunk_size=16)
    else:
        check(x, chunk_size=16 if case == "rounds" else None)


@needs_kernel
@pytest.mark.parametrize(
    "T,strength,cu", [(70, 1.0, None), (5, 1.0, None), (100, 300.0, None), (90, 1.0, [0, 33, 90])]
)
def test_kernel_features_match_naive(T, strength, cu, isa, monkeypatch):
    """Queries and keys given raw with Hedgehog maps: the kernel computes the features chunk by chunk (keys masked
    at padding), and matches the naive recurrence on the materialised features. Short chunks, strongly decaying
    states (the pairwise path recomputes the key features), packed sequences over several rounds."""
    from dsla_hf.kernels import HedgehogFeatures, LinearGates

    monkeypatch.setattr(cpp_chunk, "BLOCK_TOKENS", 64)
    gen = torch.Generator().manual_seed(1)
    B, H, HK, D, F = (1 if cu else 2), 6, 2, 24, 16
    qx, kx = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, HK, D, generator=gen)
    v = torch.randn(B, T, HK, D + 1, generator=gen)
    v[..., -1] = 1.0  # the sum normaliser's column, summed apart
    mask = torch.ones(B, T)
    mask[0, : T // 3] = 0
    gates = LinearGates(kx, torch.randn(2, HK, 2 * F, D, generator=gen) * 0.1,
                        torch.randn(2, HK, 2 * F, generator=gen) + 2, 4.0 / strength, None, mask)  # fmt: skip
    q = HedgehogFeatures(qx, torch.randn(H, D, F, generator=gen) * 0.3)
    k = HedgehogFeatures(kx, torch.randn(HK, D, F, generator=gen) * 0.3, mask)
    cu = None if cu is None else torch.tensor(cu)
    N = B if cu is None else len(cu) - 1
    h0 = torch.rand(N, 2, HK, 2 * F, D + 1, generator=gen)
    mix = torch.rand(H, 2, generator=gen)
    with torch.no_grad():
        o, final = chunk_dsla(q, k, v, gates, mix, 1.0, h0, True, cu, backend="cpp")
        o_ref, final_ref = naive_dsla(q.materialize(), k.materialize(), v, gates.materialize(), mix, 1.0, h0, True, cu)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)


@needs_kernel
def test_workspace_kept_between_calls_of_other_shapes(monkeypatch):
    """The per-thread workspace is re-zeroed only when its layout changes: calls that reuse it with fewer or shorter
    chunks (stale values past them), or after another layout, still match the naive recurrence."""
    monkeypatch.setattr(cpp_chunk, "BLOCK_TOKENS", 64)
    calls = [(150, 16, 16, 0.5), (37, 16, 16, 0.5), (90, 8, 12, 20.0), (70, 16, 16, 20.0), (9, 16, 16, 0.5)]
    for T, K, V, gate in calls:
        check(make_inputs(2, T, 6, 2, K, V, gate=gate, requires_grad=False))
