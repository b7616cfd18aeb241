"""Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors, tiny shapes) against the naive recurrence.

Run by ``test_triton.py`` in a fresh process (Triton reads TRITON_INTERPRET when it is first imported, and importing
``dsla_hf`` may import Triton through Transformers), or directly:
``TRITON_INTERPRET=1 python -m pytest tests/kernels/interpreted_triton.py``.

There is no GPU on the machines these tests run on: this checks the kernels' logic (indexing, masks, sub-chunk
factoring, state carry, in-place update), not their speed or compilation for a real device.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from dsla_hf.kernels import chunk_dsla, fold_kv, fused_recurrent_dsla, naive_dsla  # noqa: E402

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
    state = fold_kv(x["k"], x["v"], x["g1"], x["g2"], x["initial_state"], cu, chunk_size=32, backend="triton")
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


def test_triton_chunk_with_grad_falls_back_to_torch_backward():
    x = make_inputs(1, 20, 2, 1, 8, 8, gate=0.5)
    o, final, g = grads(lambda **kw: chunk_dsla(**kw, chunk_size=16, backend="triton"), x)
    o_ref, final_ref, g_ref = grads(naive_dsla, x)
    assert_close("o", o, o_ref, 1e-4)
    for name in g_ref:
        assert_close(f"d{name}", g[name], g_ref[name], 1e-4)
