"""Hedgehog features given by their inputs and maps, for kernels that compute them on the fly.

The default preset's feature map is ``[softmax(x M), softmax(-x M)]`` per head (both signs: twice the width ``F``
of the map). At 16k tokens the query features are 75 MB per layer, written once and read once; the C++ CPU kernel
takes a :class:`HedgehogFeatures` instead of the feature tensor and computes each chunk's features in cache, as it
does the gates (:class:`~.gates.LinearGates`). The other backends call :meth:`HedgehogFeatures.materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[softmax(x M), softmax(-x M)]`` per head: x [..., heads, D], weight [heads, D, F] -> fp32 [..., heads, 2F],
    differentiable."""
    z = torch.einsum("...hd,hdf->...hf", x.float(), weight.float())
    both = torch.cat([z, -z], dim=-1).unflatten(-1, (2, z.shape[-1]))  # one softmax for both signs
    return both.softmax(-1).flatten(-2)


@dataclass(frozen=True)
class HedgehogFeatures:
    """``x``: [B, T, heads, D] raw queries or keys; ``weight``: [heads, D, F]; ``mask``: [B, T] or None, 0 where the
    features must be 0 (padded keys)."""

    x: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the features, [B, T, heads, 2F]."""
        return (*self.x.shape[:3], 2 * self.weight.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the features are made of (for checks of gradients, devices and overlaps)."""
        return (self.x, self.weight) + (() if self.mask is None else (self.mask,))

    def materialize(self) -> torch.Tensor:
        """fp32 [B, T, heads, 2F], differentiable."""
        features = hedgehog(self.x, self.weight)
        if self.mask is not None:
            features = features * self.mask[:, :, None, None].to(features.dtype)
        return features


def feature_tensor(x: torch.Tensor | HedgehogFeatures) -> torch.Tensor:
    """The feature tensor a kernel reads, from a tensor or a :class:`HedgehogFeatures`."""
    return x.materialize() if isinstance(x, HedgehogFeatures) else x
