"""Runs the Triton kernel checks (``interpreted_triton.py``) under TRITON_INTERPRET=1 in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_kernels_under_interpreter():
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "interpreted_triton.py")],
        cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_triton_backend_on_cpu_tensors_takes_the_torch_path():
    """Outside the interpreter Triton cannot run CPU tensors: the Triton entry point hands them to the PyTorch path."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs CPU tensors through the Triton kernels")
    from dsla_hf.kernels import chunk_dsla

    from .utils import assert_close, grads, make_inputs

    x = make_inputs(1, 20, 4, 2, 8, 8, gate=0.5)
    o, final, g = grads(lambda **kw: chunk_dsla(**kw, chunk_size=16, backend="triton"), x)
    o_ref, final_ref, g_ref = grads(lambda **kw: chunk_dsla(**kw, chunk_size=16, backend="torch"), x)
    assert_close("o", o, o_ref, 1e-7)
    for name in g_ref:
        assert_close(f"d{name}", g[name], g_ref[name], 1e-7)
