"""One decoding step of a default-preset DSLA layer, fused: everything between the projections and ``o_proj``.

Per sequence, with a softmax window of ``W`` raw keys and values (``W = 0``: none):

1. The token that enters the states is the window's oldest (or, with no window, the new one): Hedgehog features of
   its key, ``phi = [softmax(k Mk), softmax(-k Mk)]``, and its log decays ``max(logsigmoid(Wg k + c) / tau, clamp)``
   (zero features and no decay where it is padding).
2. Both states are updated in place, ``S_s = e^{g_s} S_s + phi^T [v, 1]``, and read by the query features
   ``psi = [softmax(q Mq), softmax(-q Mq)]`` of the group's query heads: ``lin = scale * psi (sum_s mix_s S_s)``.
3. The window moves by one token (in place) and the query attends, with RoPE, to its ``W`` newest entries (the new
   one included) under one normaliser with the states' output:
   ``o = (sum_j e^{s_j - m} v_j + e^{c - m} lin[:D]) / (sum_j e^{s_j - m} + e^{c - m} lin[D] + 1e-6)``, with
   ``m = max(0, max_j s_j)`` and ``c`` the head's log scale of the states' share. With no window,
   ``o = lin[:D] / (lin[D] + 1e-6)``.

The unfused step is some thirty small PyTorch ops; here it is one call per layer and token. ``naive_decode_dsla``
is the reference (plain tensor ops), the C++ kernel (``cpp_decode.cpp``) runs on CPUs and Triton on CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import implementation, resolve_backend
from .features import hedgehog
from .window import rotate_half

Window = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # raw keys [B, W, HK, D], values, validity [B, W]


@dataclass(frozen=True, eq=False)
class DecodeWeights:
    """The parameters a step reads: Hedgehog maps ``q_map`` [H, D, F] and ``k_map`` [HK, D, F]; gates
    ``gate_weight`` [S, HK, 2F, D], ``gate_bias`` [S, HK, 2F], ``tau``, ``clamp``; mixing weights ``mix`` ([S],
    [H, S] or None: ones) and ``scale``; with a window, ``window_log_scale`` [H] and RoPE's ``inv_freq`` [D / 2]
    and ``rope_scale`` (Transformers' ``attention_scaling``).

    Checked once, when made: a layer keeps its weights while its parameters are unchanged, so that a decoding step
    checks only what changes from token to token (see :func:`check_step`)."""

    q_map: torch.Tensor
    k_map: torch.Tensor
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor
    tau: float
    clamp: float | None
    mix: torch.Tensor | None
    scale: float
    window_log_scale: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    rope_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.q_map.dim() != 3 or self.k_map.dim() != 3 or self.gate_weight.dim() != 4:
            raise ValueError("feature maps must be [H, D, F] and [HK, D, F], gates [S, HK, 2F, D]")
        H, D, F = self.q_map.shape
        S, HK = self.gate_weight.shape[:2]
        if self.k_map.shape != (HK, D, F) or H % HK:
            raise ValueError(f"feature maps must be [H, D, F] and [HK, D, F] with HK dividing H, got "
                             f"{tuple(self.q_map.shape)} and {tuple(self.k_map.shape)}")  # fmt: skip
        if self.gate_weight.shape != (S, HK, 2 * F, D) or self.gate_bias.shape != (S, HK, 2 * F) or S not in (1, 2):
            got = f"{tuple(self.gate_weight.shape)}, {tuple(self.gate_bias.shape)}"
            raise ValueError(f"gates (from the key) must be [S, {HK}, {2 * F}, {D}] and [S, {HK}, {2 * F}] with S in "
                             f"(1, 2), got {got}")  # fmt: skip
        if self.mix is not None and self.mix.shape not in ((S,), (H, S)):
            raise ValueError(f"mix must be [{S}] or [{H}, {S}], got {tuple(self.mix.shape)}")
        if self.window_log_scale is not None and self.window_log_scale.shape != (H,):
            raise ValueError(f"window_log_scale must be [{H}], got {tuple(self.window_log_scale.shape)}")
        if self.inv_freq is not None and self.inv_freq.shape != (D // 2,):
            raise ValueError(f"inv_freq must be [{D // 2}], got {tuple(self.inv_freq.shape)}")

    @functools.cached_property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(H, HK, D, F, S): query heads, key heads, head width, features per sign, states."""
        H, D, F = self.q_map.shape
        return H, self.k_map.shape[0], D, F, self.gate_weight.shape[0]

    def mix_weights(self, H: int, S: int) -> torch.Tensor:
        """fp32 [H, S], the scale folded in."""
        if self.mix is None:
            return torch.full((H, S), self.scale, device=self.q_map.device)
        return self.mix.float().expand(H, S) * self.scale

    @functools.cached_property
    def gates_by_key(self) -> torch.Tensor:
        """fp32 [HK, D, S * 2F]: per KV head, both states' gate weights as one matrix that the key multiplies (the
        C++ kernel's layout: one register-blocked product instead of S * 2F dot products), made once."""
        S, HK, F2, D = self.gate_weight.shape
        return self.gate_weight.detach().float().permute(1, 3, 0, 2).reshape(HK, D, S * F2).contiguous()

    @functools.cached_property
    def fp32(self) -> DecodeWeights:
        """These weights as fp32 contiguous tensors (the CPU kernel's operands), made once: fp32 contiguous weights
        are shared, others copied (make new weights after changing those)."""
        cast = lambda x: None if x is None else x.detach().float().contiguous()  # noqa: E731
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return DecodeWeights(**{k: cast(x) if isinstance(x, torch.Tensor) else x for k, x in fields.items()})


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0):
    """Llama's RoPE tables (cos, sin) fp32 [..., N, D] at positions [..., N], as Transformers computes them."""
    freqs = positions.float()[..., None] * inv_freq.float()  # [..., N, D/2]
    return torch.cat([freqs.cos(), freqs.cos()], -1) * scale, torch.cat([freqs.sin(), freqs.sin()], -1) * scale


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Llama's rotary embedding of x [B, N, heads, D] at positions [B, N] (rotate-half convention), fp32."""
    cos, sin = rope_tables(positions, inv_freq, scale)
    x = x.float()
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


@torch.no_grad()
def naive_decode_dsla(q, k, v, state, weights: DecodeWeights, window=None, positions=None, mask=None):
    """The reference step in plain tensor ops (same arguments and results as :func:`fused_decode_dsla`)."""
    B, H, D = q.shape
    S, HK = state.shape[1], state.shape[2]
    G = H // HK
    ones = q.new_ones(B, dtype=torch.float32)
    new_valid = ones if mask is None else mask.float()
    if window is not None:
        keys, values, valid = window
        k_in, v_in, m_in = keys[:, 0], values[:, 0], valid[:, 0].float()
    else:
        k_in, v_in, m_in = k, v, new_valid
    k_in = k_in.float()
    phi = hedgehog(k_in, weights.k_map) * m_in[:, None, None]  # [B, HK, 2F]
    u = torch.einsum("shfd,bhd->bshf", weights.gate_weight.float(), k_in) + weights.gate_bias.float()
    g = F.logsigmoid(u) / weights.tau
    if weights.clamp is not None:
        g = g.clamp(min=weights.clamp)
    g = g * m_in[:, None, None, None]
    v_ext = torch.cat([v_in.float(), ones[:, None, None].expand(B, HK, 1)], -1)  # [B, HK, D + 1]
    new_state = g.exp()[..., None] * state + (phi[..., None] * v_ext[:, :, None, :])[:, None]
    state.copy_(new_state)
    psi = hedgehog(q, weights.q_map).view(B, HK, G, -1)
    w = weights.mix_weights(H, S).view(HK, G, S)
    lin = torch.einsum("bagf,ags,bsafv->bagv", psi, w, state).reshape(B, H, D + 1)
    if window is None:
        return (lin[..., :D] / (lin[..., D:] + 1e-6)).to(q.dtype)
    keys.copy_(torch.cat([keys[:, 1:], k[:, None].to(keys.dtype)], 1))
    values.copy_(torch.cat([values[:, 1:], v[:, None].to(values.dtype)], 1))
    valid.copy_(torch.cat([valid[:, 1:], new_valid[:, None].to(valid.dtype)], 1))
    q_rot = rope(q[:, None], positions[:, -1:], weights.inv_freq, weights.rope_scale)[:, 0] * D**-0.5
    k_rot = rope(keys, positions[:, 1:], weights.inv_freq, weights.rope_scale)  # [B, W, HK, D]
    scores = torch.einsum("bagd,bwad->bagw", q_rot.view(B, HK, G, D), k_rot)
    scores = scores.masked_fill(valid[:, None, None, :] <= 0, float("-inf"))
    top = scores.amax(-1, keepdim=True).clamp(min=0.0)
    p = (scores - top).exp()
    num = torch.einsum("bagw,bwav->bagv", p, values.float()).reshape(B, H, D)
    den = p.sum(-1).reshape(B, H, 1)
    c = (weights.window_log_scale.float().view(HK, G, 1) - top.view(B, HK, G, 1)).exp().reshape(B, H, 1)
    return ((num + c * lin[..., :D]) / (den + c * lin[..., D:] + 1e-6)).to(q.dtype)


def check_step(q, k, v, state, weights: DecodeWeights, window, positions, mask) -> None:
    """Shapes, dtypes and devices of a step against its weights (checked when they were made), for every backend."""
    H, HK, D, F, S = weights.dims
    B = q.shape[0]
    if q.shape != (B, H, D) or k.shape != (B, HK, D) or v.shape != k.shape:
        raise ValueError(f"q [B, {H}, {D}] (query heads), k and v [B, {HK}, {D}] expected by these weights, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if state.dtype != torch.float32 or state.shape != (B, S, HK, 2 * F, D + 1):
        raise ValueError(f"state must be fp32 [{B}, {S}, {HK}, {2 * F}, {D + 1}], got {state.dtype} "
                         f"{tuple(state.shape)}")  # fmt: skip
    if not state.is_contiguous():
        raise ValueError("state must be contiguous: it is updated in place")
    if mask is not None and mask.shape != (B,):
        raise ValueError(f"mask must have shape ({B},), got {tuple(mask.shape)}")
    device = q.device
    if k.device != device or v.device != device or state.device != device:
        raise ValueError("all inputs of a step must be on one device")
    if window is None:
        return
    keys, values, valid = window
    W = keys.shape[1]
    if keys.shape != (B, W, HK, D) or values.shape != keys.shape or valid.shape != (B, W) or W == 0:
        raise ValueError(f"window must be keys and values [{B}, W, {HK}, {D}] and validity [{B}, W] with W > 0")
    if not (keys.is_contiguous() and values.is_contiguous() and valid.is_contiguous()):
        raise ValueError("the window must be contiguous: it moves in place")
    if positions is None or positions.shape != (B, W + 1):
        raise ValueError(f"positions of the {W} window entries and the new token [{B}, {W + 1}] are needed")
    if weights.window_log_scale is None or weights.inv_freq is None:
        raise ValueError("a window needs window_log_scale [H] and inv_freq [D / 2]")
    if keys.device != device or values.device != device or valid.device != device or positions.device != device:
        raise ValueError("all inputs of a step must be on one device")


def fused_decode_dsla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    weights: DecodeWeights,
    window: Window | None = None,
    positions: torch.LongTensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One decoding step of a default-preset DSLA layer (Hedgehog features, gates from the key, sum normaliser,
    optional softmax window), the states and the window updated in place.

    Args:
        q: [B, H, D] the new token's queries (after the projection and its LoRA, before RoPE).
        k, v: [B, HK, D] its raw key and value.
        state: fp32 [B, S, HK, 2F, D + 1], updated in place.
        weights: the layer's :class:`DecodeWeights`.
        window: raw keys and values [B, W, HK, D] and validity [B, W] of the window, oldest first (contiguous,
            moved by one token in place), or None.
        positions: [B, W + 1] positions of the window's entries and of the new token (with a window).
        mask: [B], 0 where the new token is padding, or None.
        backend: None (C++ on CPUs where it builds, Triton on CUDA, else the reference), "cpp", "triton", "naive".

    Returns:
        o: [B, H, D] in q's dtype, the input of ``o_proj``.
    """
    check_step(q, k, v, state, weights, window, positions, mask)
    backend = resolve_backend("decode", q, backend, cpp=True)
    return implementation("decode", backend)(q, k, v, state, weights, window=window, positions=positions, mask=mask)


def decode_backend(device: torch.device) -> str:
    """The fused step's default backend on a device: Triton on CUDA, the C++ kernel on CPUs where it is the chunk
    kernel's default too, else the reference."""
    return resolve_backend("decode", device, cpp=True)
