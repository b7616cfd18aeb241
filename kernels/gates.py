"""Log decays given by their inputs and a linear map, for kernels that compute them on the fly.

DSLA's gates are ``log a = max(logsigmoid(x W^T + c) / tau, clamp)`` per state, head and feature, with ``x`` the
key of each state head or the layer's input (shared by the heads), and ``0`` (no decay) at padded tokens. At 16k
tokens the materialised gates are 25 MB per layer, written once and read once; the C++ CPU kernel takes a
:class:`LinearGates` instead and computes each chunk's gates in cache. Every kernel entry point accepts one in
place of the gate tensor ``g``; the other backends call :meth:`LinearGates.materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearGates:
    """``x``: [B, T, H, D] (one input per state head) or [B, T, D] (shared); ``weight``: [S, H, F, D];
    ``bias``: [S, H, F]; ``mask``: [B, T] or None, 0 at padded tokens."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    tau: float
    clamp: float | None = None
    mask: torch.Tensor | None = None

    @property
    def num_states(self) -> int:
        return self.weight.shape[0]

    @property
    def per_head(self) -> bool:
        return self.x.dim() == 4

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the gates are made of (for checks of gradients, devices and overlaps)."""
        return (self.x, self.weight, self.bias) + (() if self.mask is None else (self.mask,))

    def materialize(self) -> torch.Tensor:
        """fp32 [B, T, S, H, F] (a strided view for per-head inputs), differentiable."""
        S, H, F_, D = self.weight.shape
        B, T = self.x.shape[:2]
        # logsigmoid(u) / tau = softplus(u / tau, beta=-tau), 3x faster than F.logsigmoid on CPU. The bias and 1 / tau
        # go into the product, so one pass over the gates remains; in place when no gradient is needed.
        weight, bias, scale = self.weight.float(), self.bias.float(), 1.0 / self.tau
        if self.per_head:  # one batched matmul over heads, [H, B*T, S*F]
            x = self.x.float().reshape(B * T, H, D).transpose(0, 1)
            weight = weight.permute(1, 3, 0, 2).reshape(H, D, S * F_)
            z = torch.baddbmm(bias.transpose(0, 1).reshape(H, 1, S * F_), x, weight, beta=scale, alpha=scale)
            z = z.view(H, B, T, S, F_).permute(1, 2, 3, 0, 4)
        else:
            x = self.x.float().reshape(B * T, D)
            z = torch.addmm(bias.reshape(-1), x, weight.reshape(-1, D).T, beta=scale, alpha=scale)
            z = z.view(B, T, S, H, F_)
        if z.requires_grad:
            g = F.softplus(z, beta=-self.tau)
        else:  # no second tensor of the gates' size: at 16k tokens it is 25 MB of fresh pages per layer
            g = torch.ops.aten.softplus.out(z, -self.tau, 20.0, out=z)
        if self.clamp is not None:
            g = g.clamp(min=self.clamp)
        if self.mask is not None:
            g = g * self.mask[:, :, None, None, None].to(g.dtype)
        return g


def gate_tensor(g: torch.Tensor | LinearGates) -> torch.Tensor:
    """The log decays [B, T, S, H, F] a kernel reads, from a tensor or a :class:`LinearGates`."""
    return g.materialize() if isinstance(g, LinearGates) else g
