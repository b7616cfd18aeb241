"""Dense projections on CPUs: `linear` (and `Linear`, an ``nn.Linear`` that calls it) runs float32 products,
forward and backward, through oneDNN where MKL, PyTorch's default, would leave the CPU's vector width unused.

MKL picks its code by CPU vendor: on AMD it runs its AVX2 ("zen") sgemm even where the CPU has AVX-512, which
oneDNN uses on any vendor. On a Zen 5 EPYC with AVX-512 that is 1.8-2.3x on SmolLM2's projections at 512-4096
tokens and 2.6x on its LM head at one token (`benchmarks/bench_linear.py`). With both libraries limited to AVX2
(an AVX2-only AMD's code) oneDNN is 1.04-1.3x on the products alone, but the default layer ran slower with it at
512 and 16k tokens (0.86x and 7.27x against softmax, 0.92x and 8.13x with MKL), so AVX2 code keeps MKL, but for
products with wide outputs (an LM head: `WIDE_OUTPUTS`), for which MKL is slow there. On Intel CPUs MKL runs its
AVX-512 code, so there the default stays MKL.

Like the rest of this package, the module imports nothing from ``dsla_hf``: saved models carry it as remote code.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import cpu_isa, cpuinfo

# Below this many multiply-adds oneDNN's fixed cost per call (~15 us on the Zen 5) loses to MKL: a decoding step's
# q, k, v and o products at one token (0.33M and 0.11M) stay with MKL, its MLP and LM head go to oneDNN.
ONEDNN_MIN_MACS = 800_000

# Products whose outputs are this many times their inputs (an LM head's vocabulary) run oneDNN on AVX2 code too, on
# CPUs not made by Intel: there MKL's float32 product is slow for them. SmolLM2's LM head (576 -> 49152) ran 1.9-2.3x
# faster with oneDNN at one token, 1.5-2.0x at 8 and 1.04-1.18x at 512-4096 on two AVX2-only EPYCs (Zen 1, Zen 3)
# and on a Zen 5's AVX2 code, where its other products ranged from 0.4x to 1.6x (`benchmarks/bench_linear.py`).
WIDE_OUTPUTS = 16


def _forced() -> bool | None:
    """``DSLA_HF_ONEDNN_LINEAR``'s choice (always False where PyTorch has no oneDNN), or None: the rule decides."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    choice = os.environ.get("DSLA_HF_ONEDNN_LINEAR")
    return None if choice is None else choice == "1"


@functools.cache
def onednn_preferred() -> bool:
    """Whether float32 CPU products run `linear` through oneDNN. ``DSLA_HF_ONEDNN_LINEAR=1`` forces it (where
    PyTorch has oneDNN), ``=0`` keeps MKL; unset, the rule: a CPU with AVX-512 that is not Intel's (where MKL runs
    AVX2 code), unless ``DSLA_HF_CPU_ISA=avx2`` asks for an AVX2 machine's code paths."""
    if (forced := _forced()) is not None:
        return forced
    if os.environ.get("DSLA_HF_CPU_ISA", "native").lower() == "avx2":  # an AVX2 machine's code paths
        return False
    return cpu_isa() == "avx512" and cpuinfo().get("vendor_id") != "GenuineIntel"


def onednn_for_wide_outputs() -> bool:
    """Whether products with wide outputs (:data:`WIDE_OUTPUTS`) run oneDNN where the others keep MKL: on any CPU
    with AVX2 or more that is not Intel's (``DSLA_HF_ONEDNN_LINEAR`` decides for them too)."""
    if (forced := _forced()) is not None:
        return forced
    return cpu_isa() in ("avx2", "avx512") and cpuinfo().get("vendor_id") != "GenuineIntel"


def picks_onednn(multiply_adds: int, wide: bool = False) -> bool:
    """Whether a float32 CPU product of this many multiply-adds runs oneDNN (the rule of `linear`); `wide`: its
    outputs are at least :data:`WIDE_OUTPUTS` times its inputs."""
    if multiply_adds < ONEDNN_MIN_MACS:
        return False
    return onednn_preferred() or wide and onednn_for_wide_outputs()


def projection_libraries() -> str:
    """In words, the libraries of `linear` here, for result files: "onednn", "mkl", or "mkl, onednn for wide
    outputs"."""
    if onednn_preferred():
        return "onednn"
    return "mkl, onednn for wide outputs" if onednn_for_wide_outputs() else "mkl"


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """oneDNN's product forward and for the input's gradient; the weight's gradient (only for trained weights: most
    projections stay frozen while a DSLA layer trains) by ``torch.mm``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)  # x kept only for the weight's grad
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = _onednn(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_w = rows.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = rows.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU float32 tensors outside autocast, by oneDNN where :func:`picks_onednn`
    (by the CPU, the product's size and the width of its outputs), with gradients too (equal within float32
    rounding: the two libraries sum in different orders). `out` (inference only) receives the result on the MKL
    path; oneDNN's matmul has none, so use the returned tensor."""
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        multiply_adds = x.numel() // max(1, x.shape[-1]) * weight.numel()
        if picks_onednn(multiply_adds, wide=weight.shape[0] >= WIDE_OUTPUTS * weight.shape[1]):
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
                return _OneDNNLinear.apply(x, weight, bias)
            return _onednn(x, weight, bias)
    if out is None:
        return F.linear(x, weight, bias)
    torch.matmul(x, weight.t(), out=out)
    return out if bias is None else out.add_(bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear`: the same parameters, state dict and training behaviour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_fast_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` under `module` a :class:`Linear`, in place (a subclass with no state of its
    own, so the weights stay where they are and ``isinstance(m, nn.Linear)`` still holds). Returns `module`."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module
