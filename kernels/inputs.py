"""The inputs of a DSLA kernel call, checked once by its entry point, and the chunk sizes the backends share.

Every entry point (``chunk_dsla``, ``fused_recurrent_dsla``, ``fold_kv``, ``naive_dsla``) calls :func:`check_inputs`
and hands the :class:`DSLAInputs` it returns to one backend, which checks nothing again. Shapes follow
flash-linear-attention (time-major):

    q              [B, T, H, K]        queries, after the query feature map
    k              [B, T, HK, K]       keys, after the key feature map
    v              [B, T, HK, V]       values
    g              [B, T, S, HK, K]    log decays (<= 0) of the states: S = 2 (DSLA), or 1 (a single-state, GLA layer)
    mix            [H, S]              mixing weights of the states (given as None, [S] or [H, S])
    initial_state  [N, S, HK, K, V]    fp32 states before each of the N sequences (B, or len(cu_seqlens) - 1)

Query head ``h`` reads the states of key/value head ``h // (H // HK)`` (the grouping of ``repeat_kv``). With
``cu_seqlens`` (B must be 1) the batch is packed: sequence ``n`` spans ``cu_seqlens[n]:cu_seqlens[n+1]``.

    S_s,t = diag(exp(g_s,t)) S_s,t-1 + k_t^T v_t
    o_t   = scale * q_t (sum_s mix_s S_s,t)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .features import HedgehogFeatures, feature_tensor
from .gates import LinearGates, gate_tensor

# Chunk sizes when none is given. CPU inference is ~10 % faster with 32-token chunks (cheaper intra-chunk products;
# the scan over chunks is cheap), on the PyTorch path and in the C++ kernel alike. Training's per-chunk backward
# work favours 64, as do the Triton kernels; the KV fold uses it too.
INFERENCE_CHUNK, CHUNK = 32, 64
BLOCK_TOKENS = 1024  # long inference inputs are processed this many tokens at a time: intermediates stay in cache
# Inference inputs of at most this many tokens after a state (a decode step, a short chunk) take the recurrent
# kernel; longer ones the chunked one.
RECURRENT_MAX_TOKENS = 4


def parts(x: torch.Tensor | HedgehogFeatures | LinearGates | None) -> tuple[torch.Tensor, ...]:
    """The tensors an input is made of (for checks of gradients, devices and overlaps)."""
    if x is None:
        return ()
    return (x,) if isinstance(x, torch.Tensor) else x.tensors()


@dataclass(frozen=True)
class DSLAInputs:
    """A kernel call's inputs as :func:`check_inputs` leaves them: the caller's tensors (features and gates possibly
    still given by their inputs), ``mix`` as fp32 [H, S], ``scale`` a number, and the sizes (see the module
    docstring). ``q`` is None for :func:`~.fold.fold_kv`, which reads no queries."""

    q: torch.Tensor | HedgehogFeatures | None
    k: torch.Tensor | HedgehogFeatures
    v: torch.Tensor
    g: torch.Tensor | LinearGates
    mix: torch.Tensor
    scale: float
    initial_state: torch.Tensor | None
    output_final_state: bool
    cu_seqlens: torch.LongTensor | None
    needs_grad: bool  # autograd is on and some input requires a gradient
    B: int
    T: int
    H: int
    HK: int
    K: int
    V: int
    S: int
    N: int  # sequences: B, or len(cu_seqlens) - 1

    @property
    def G(self) -> int:
        """Query heads per key/value head."""
        return self.H // self.HK

    @property
    def device(self) -> torch.device:
        return self.v.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*parts(self.q), *parts(self.k), self.v, self.mix, *parts(self.initial_state), *parts(self.g))

    def materialized(self) -> DSLAInputs:
        """The same inputs with features and gates as tensors (every backend but the C++ one reads tensors)."""
        if all(isinstance(x, torch.Tensor | None) for x in (self.q, self.k, self.g)):
            return self
        # gates first, then queries and keys: the order the autograd graph has always been built in
        g = gate_tensor(self.g)
        return replace(self, g=g, q=None if self.q is None else feature_tensor(self.q), k=feature_tensor(self.k))


def check_inputs(
    q: torch.Tensor | HedgehogFeatures | None,
    k: torch.Tensor | HedgehogFeatures,
    v: torch.Tensor,
    g: torch.Tensor | LinearGates,
    mix: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> DSLAInputs:
    """Shapes checked (GQA grouping, gates, mixing weights, initial states, packing), the mixing weights as fp32
    [H, S] (ones when None) and the default scale ``K ** -0.5``: once per call, for every backend."""
    if len(k.shape) != 4:
        raise ValueError(f"keys must be [B, T, HK, K], got {tuple(k.shape)}")
    B, T, HK, K = k.shape
    H = HK if q is None else q.shape[2]
    if q is not None and (len(q.shape) != 4 or tuple(q.shape[:2]) != (B, T) or q.shape[3] != K):
        raise ValueError(f"queries {tuple(q.shape)} do not fit keys {tuple(k.shape)}: [B, T, H, K] expected")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, HK):
        raise ValueError(f"values must be [{B}, {T}, {HK}, V], got {tuple(v.shape)}")
    if H % HK:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HK})")
    for name, x in (("queries", q), ("keys", k)):
        if isinstance(x, HedgehogFeatures):
            _check_features(name, x, B, T)
    S = _check_gates(g, B, T, HK, K)
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError("cu_seqlens requires a batch of size 1 (packed sequences)")
        N = len(cu_seqlens) - 1
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (N, S, HK, K, V):
        raise ValueError(f"initial_state must have shape {(N, S, HK, K, V)}, got {tuple(initial_state.shape)}")
    if mix is None:
        mix = torch.ones(H, S, device=v.device)
    elif tuple(mix.shape) not in ((S,), (H, S)):
        raise ValueError(f"mix must be [{S}] or [{H}, {S}], got {tuple(mix.shape)}")
    else:
        mix = mix.float()
        mix = mix.expand(H, S) if mix.dim() == 1 else mix
    inputs = (*parts(q), *parts(k), v, mix, *parts(initial_state), *parts(g))
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    scale = K**-0.5 if scale is None else scale
    return DSLAInputs(q, k, v, g, mix, scale, initial_state, output_final_state, cu_seqlens, needs_grad,
                      B, T, H, HK, K, V, S, N)  # fmt: skip


def _check_features(name: str, x: HedgehogFeatures, B: int, T: int) -> None:
    heads, D = x.x.shape[2:]
    if x.weight.dim() != 3 or tuple(x.weight.shape[:2]) != (heads, D):
        raise ValueError(f"raw {name} {tuple(x.x.shape)} do not fit their maps {tuple(x.weight.shape)}")
    if x.mask is not None and tuple(x.mask.shape) != (B, T):
        raise ValueError(f"the features' mask must have shape {(B, T)}, got {tuple(x.mask.shape)}")


def _check_gates(g: torch.Tensor | LinearGates, B: int, T: int, HK: int, K: int) -> int:
    """The number of states of gates that fit the keys."""
    if not isinstance(g, LinearGates):
        if g.dim() != 5 or tuple(g.shape[:2]) != (B, T) or tuple(g.shape[3:]) != (HK, K):
            raise ValueError(f"gates must be [{B}, {T}, S, {HK}, {K}], got {tuple(g.shape)}")
        S = g.shape[2]
    else:
        S, heads, F, D = g.weight.shape
        if heads != HK or F != K or tuple(g.bias.shape) != (S, heads, F):
            raise ValueError(f"gates of shape {tuple(g.weight.shape)} (states, heads, features, inputs) do not fit "
                             f"{HK} key/value heads of {K} features")  # fmt: skip
        x = g.x
        if tuple(x.shape[:2]) != (B, T) or x.shape[-1] != D or (g.per_head and x.shape[2] != HK):
            raise ValueError(f"gate inputs of shape {tuple(x.shape)} do not fit {B}x{T} tokens, {HK} heads, {D} "
                             "inputs")  # fmt: skip
        if g.mask is not None and tuple(g.mask.shape) != (B, T):
            raise ValueError(f"the gates' mask must have shape {(B, T)}, got {tuple(g.mask.shape)}")
    if S not in (1, 2):
        raise ValueError(f"DSLA has one or two states, the gates have {S}")
    return S
