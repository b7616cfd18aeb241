"""fused_recurrent_dsla and fold_kv against the naive recurrence; uninitialised-memory and import-hygiene checks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import dsla_hf.kernels as kernels
from dsla_hf.kernels import chunk_dsla, fold_kv, fused_recurrent_dsla, naive_dsla
from dsla_hf.kernels.dispatch import cpp_available

from .utils import assert_close, grads, make_inputs


@pytest.mark.parametrize("states", [2, 1])
@pytest.mark.parametrize("T", [1, 3])
def test_fused_recurrent_matches_naive(states, T):
    x = make_inputs(2, T, 6, 2, 16, 17, states=states, gate=0.5)
    o, final, g = grads(fused_recurrent_dsla, x)
    o_ref, final_ref, g_ref = grads(naive_dsla, x)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
    for name in g_ref:
        assert_close(f"d{name}", g[name], g_ref[name], 1e-5)


def test_fused_recurrent_chained_inplace_steps():
    """Prefill with chunk_dsla, then decode token by token updating the state in place: same as one naive pass."""
    x = make_inputs(2, 80, 6, 2, 16, 16, gate=(0.1, 5.0), requires_grad=False)
    o_ref, final_ref = naive_dsla(**x, output_final_state=True)
    P = 70
    head = {k: (t[:, :P] if k not in ("mix", "initial_state") and t is not None else t) for k, t in x.items()}
    o_pre, state = chunk_dsla(**head, output_final_state=True)
    outs = [o_pre]
    for t in range(P, 80, 2):  # two tokens per step
        step = {
            k: (v[:, t : t + 2] if k not in ("mix", "initial_state") and v is not None else v) for k, v in x.items()
        }
        step["initial_state"] = state
        o, returned = fused_recurrent_dsla(**step, inplace=True)
        assert returned is state  # updated in place
        outs.append(o)
    assert_close("o", torch.cat(outs, 1), o_ref, 1e-5)
    assert_close("final_state", state, final_ref, 1e-5)


def test_fused_recurrent_varlen_and_no_initial_state():
    x = make_inputs(1, 5, 4, 4, 8, 8, gate=0.5, h0=False, requires_grad=False)
    cu = torch.tensor([0, 2, 3, 5])
    o, final = fused_recurrent_dsla(**x, output_final_state=True, cu_seqlens=cu)
    o_ref, final_ref = naive_dsla(**x, output_final_state=True, cu_seqlens=cu)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
    o2, state = fused_recurrent_dsla(**x, inplace=True)  # no state given: starts from zeros and returns it
    assert_close("final_state", state, naive_dsla(**x, output_final_state=True)[1], 1e-5)


@pytest.mark.parametrize("states", [2, 1])
@pytest.mark.parametrize("T", [1, 63, 130])
def test_fold_kv_matches_naive(states, T):
    x = make_inputs(2, T, 6, 2, 16, 65, states=states, gate=(0.05, 3.0), requires_grad=False)
    state = fold_kv(x["k"], x["v"], x["g"], initial_state=x["initial_state"])
    assert_close("state", state, naive_dsla(**x, output_final_state=True)[1], 1e-5)


def test_fold_kv_varlen():
    x = make_inputs(1, 100, 3, 3, 8, 8, gate=0.3, h0=False, requires_grad=False)
    cu = torch.tensor([0, 1, 64, 100])
    h0 = torch.randn(3, 2, 3, 8, 8)
    state = fold_kv(x["k"], x["v"], x["g"], initial_state=h0, cu_seqlens=cu)
    ref = naive_dsla(**dict(x, initial_state=h0), output_final_state=True, cu_seqlens=cu)[1]
    assert_close("state", state, ref, 1e-5)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty & co. return NaN-filled memory, so any read of an element never written shows up."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))


def test_no_uninitialised_reads(nan_empty):
    assert torch.isnan(torch.empty(3)).all()  # the fixture is active
    x = make_inputs(2, 70, 6, 2, 16, 16, gate=(0.1, 3.0))
    with torch.no_grad():
        o_ref, final_ref = naive_dsla(**x, output_final_state=True)
    o, final, g = grads(chunk_dsla, x)
    assert_close("o", o, o_ref, 1e-4)
    assert_close("final_state", final, final_ref, 1e-4)
    assert all(torch.isfinite(t).all() for t in g.values())
    long = make_inputs(1, 1100, 3, 1, 8, 8, gate=0.05, requires_grad=False)
    cu = torch.tensor([0, 5, 70])
    x = make_inputs(1, 70, 6, 2, 16, 16, gate=0.3, h0=False, requires_grad=False)
    backends = ["torch", "cpp"] if cpp_available() else ["torch"]
    for backend in backends:  # the blocked inference path, and packed sequences
        with torch.no_grad():
            o, final = chunk_dsla(**long, output_final_state=True, chunk_size=32, backend=backend)
        assert torch.isfinite(o).all() and torch.isfinite(final).all(), backend
        with torch.no_grad():
            o, final = chunk_dsla(**x, output_final_state=True, cu_seqlens=cu, backend=backend)
        assert torch.isfinite(o).all() and torch.isfinite(final).all(), backend
    assert torch.isfinite(fold_kv(x["k"], x["v"], x["g"], cu_seqlens=cu)).all()
    state = torch.zeros(1, 2, 2, 16, 16)
    o, _ = fused_recurrent_dsla(**dict(x, initial_state=state), inplace=True)
    assert torch.isfinite(o).all()


FLAT = [
    "__init__.py", "dispatch.py", "inputs.py", "naive.py", "chunk.py", "fused_recurrent.py", "fold.py", "decode.py",
    "window.py", "gates.py", "features.py",
]  # fmt: skip


@pytest.mark.parametrize("name", FLAT)
def test_remote_code_modules_are_flat(name):
    """Modules copied into saved model folders: only flat one-level relative imports, triton and the rest of
    dsla_hf only inside functions (lazily, by absolute import)."""
    tree = ast.parse((Path(kernels.__file__).parent / name).read_text())
    for node in tree.body:  # module level only
        if isinstance(node, ast.ImportFrom):
            assert node.level in (0, 1), f"{name}: nested relative import"
            if node.level == 1:
                assert (
                    node.module
                    and "." not in node.module
                    and (Path(kernels.__file__).parent / f"{node.module}.py").is_file()
                )
            else:
                assert not (node.module or "").startswith(("triton", "dsla_hf")), f"{name}: {node.module}"
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith(("triton", "dsla_hf")) for a in node.names), name


def test_dispatch_on_cpu_uses_torch():
    from dsla_hf.kernels.dispatch import resolve_backend

    assert resolve_backend("chunk", torch.zeros(1)) == "torch"
    assert resolve_backend("chunk", torch.zeros(1), "naive") == "naive"
    assert resolve_backend("decode", torch.device("cpu")) == "naive"  # no PyTorch path: the reference
    for operation, backend in [("chunk", "bogus"), ("recurrent", "cpp"), ("fold", "cpp"), ("window", "naive")]:
        with pytest.raises(ValueError, match="unknown backend"):
            resolve_backend(operation, torch.zeros(1), backend)


def test_inputs_are_checked_once_for_every_backend():
    """Shapes, grouped heads, gates, mixing weights, initial states and packing are refused by the entry points
    whatever the backend."""
    x = make_inputs(2, 10, 6, 2, 8, 8, requires_grad=False)
    bad = {
        "multiple of key/value heads": dict(x, q=torch.randn(2, 10, 5, 8)),
        "gates must be": dict(x, g=x["g"][:, :, :, :1]),
        "one or two states": dict(x, g=torch.cat([x["g"], x["g"][:, :, :1]], 2)),
        "mix must be": dict(x, mix=torch.rand(3)),
        "initial_state must have shape": dict(x, initial_state=torch.zeros(3, 2, 2, 8, 8)),
        "values must be": dict(x, v=x["v"][:, :9]),
    }
    for backend in ("torch", "naive"):
        for message, inputs in bad.items():
            for fn in (chunk_dsla, fused_recurrent_dsla):
                with pytest.raises(ValueError, match=message):
                    fn(**inputs, backend=backend)
        with pytest.raises(ValueError, match="batch of size 1"):
            chunk_dsla(**x, cu_seqlens=torch.tensor([0, 10]), backend=backend)
        with pytest.raises(ValueError, match="gates must be"):
            fold_kv(x["k"], x["v"], x["g"][:, :5], backend=backend)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        naive_dsla(**bad["multiple of key/value heads"])
