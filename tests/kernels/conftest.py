"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest

from dsla_hf.kernels.dispatch import cpu_isa

ISAS = ["native"] + (["avx2"] if cpu_isa() == "avx512" else [])  # AVX2 code runs on AVX-512 CPUs too


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Each code path of the C++ kernels this CPU can run: its own, and AVX2's on an AVX-512 CPU."""
    monkeypatch.setenv("DSLA_HF_CPU_ISA", request.param)
    return request.param
