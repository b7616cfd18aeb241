"""Scratch tensors for CPU inference: the same memory per name while it fits, and model outputs that never alias it."""

from __future__ import annotations

import torch

from dsla_hf import convert_llama_to_dsla
from dsla_hf.kernels import scratch, workspace


def test_scratch_reuses_memory_per_name_up_to_the_cap(monkeypatch):
    a = scratch("test_a", (4, 8), torch.device("cpu"))
    assert scratch("test_a", (2, 3), "cpu").data_ptr() == a.data_ptr()  # smaller: the same memory
    assert scratch("test_b", (4, 8), "cpu").data_ptr() != a.data_ptr()  # another name: its own
    assert scratch("test_a", (4, 8), "cpu", torch.float64).dtype == torch.float64
    grown = scratch("test_a", (64, 64), "cpu")
    assert grown.shape == (64, 64) and scratch("test_a", (64, 64), "cpu").data_ptr() == grown.data_ptr()
    monkeypatch.setattr(workspace, "KEEP_BYTES", 1024)
    big = scratch("test_c", (1024,), "cpu")  # 4 KiB > the cap: fresh each time
    assert scratch("test_c", (1024,), "cpu").data_ptr() != big.data_ptr()


def test_outputs_do_not_alias_scratch_across_calls(tiny_teacher):
    """Inference (scratch tensors in use) against runs with gradients on (none in use): logits equal, and a first
    call's logits and cache unchanged by a second call on other tokens."""
    student = convert_llama_to_dsla(tiny_teacher, layers="all", active=[0, 1, 3], dsla_window=4).eval()
    first, second = torch.randint(3, 101, (2, 40)), torch.randint(3, 101, (1, 70))
    with torch.no_grad():
        out1 = student(first, use_cache=True)
        kept = [out1.logits, out1.past_key_values.layers[0].state, *out1.past_key_values.layers[0].window]
        copies = [t.clone() for t in kept]
        out2 = student(second, use_cache=True)
    for tensor, copy in zip(kept, copies):
        torch.testing.assert_close(tensor, copy, rtol=0, atol=0)
    with torch.enable_grad():
        fresh2 = student(second).logits
        fresh1 = student(first).logits
    torch.testing.assert_close(out2.logits, fresh2.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(copies[0], fresh1.detach(), rtol=1e-4, atol=1e-5)
