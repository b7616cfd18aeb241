"""DSLA-Llama: a Llama whose layers each run softmax attention or DSLA (dual-state linear attention).

Every layer keeps the teacher's softmax attention (`self_attn`). Layers listed in `config.dsla_layers` also own a
`linear_attn` (the DSLA parameters); `config.layer_types` says which of the two each layer runs, and
`set_dsla_layers` changes that at run time without touching any weight.

    S1_t = diag(a1_t) S1_{t-1} + phi(k_t)^T v_t     history state (slow decay)
    S2_t = diag(a2_t) S2_{t-1} + phi(k_t)^T v_t     recency state (fast decay)
    o_t  = psi(q_t) (g1 S1_t + g2 S2_t)              then o_proj
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)
from transformers.utils import logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ...kernels import (
    RECURRENT_MAX_TOKENS,
    DecodeWeights,
    HedgehogFeatures,
    LinearGates,
    advance_window,
    backend_summary,
    chunk_dsla,
    decode_backend,
    feature_tensor,
    fold_kv,
    fused_decode_dsla,
    fused_recurrent_dsla,
    hedgehog,
    linear,
    projection_libraries,
    scratch,
    use_fast_linears,
    window_attention,
)
from .cache_dsla import DSLACache, DSLACacheLayer
from .configuration_dsla import FULL_ATTENTION, LINEAR_ATTENTION, DSLAConfig
from .remote_code import AUTO_MAP, write_remote_code

logger = logging.get_logger(__name__)


@functools.cache
def announce_kernels(device: torch.device) -> None:
    """Say once per device which kernels the DSLA layers run (remote code included)."""
    libraries = projection_libraries() if device.type == "cpu" else "mkl"
    projections = "" if libraries == "mkl" else f"; projections by {libraries}"
    logger.warning(f"DSLA layers on {device} run {backend_summary(device)}{projections}")


def undo_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of RoPE on [B, T, H, D] keys; dividing by cos^2 + sin^2 also undoes any attention scaling."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def half_life_logit(half_life: float, tau: float) -> float:
    """Gate bias b such that logsigmoid(b) / tau = log(0.5) / half_life."""
    log_a = -tau * math.log(2.0) / half_life
    return log_a - math.log(-math.expm1(log_a))


def document_starts(cu_seqlens: torch.LongTensor, batch: int, length: int, device) -> torch.LongTensor:
    """[batch, length]: for each token of rows packed as `cu_seqlens` (document boundaries over the rows laid end to
    end; every row boundary a document boundary), the index in its row of its document's first token."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    total = batch * length
    if cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to {total} (the batch's tokens laid end to end), got {bounds}")
    if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {bounds}")
    if not set(range(0, total, length)) <= set(bounds):
        raise ValueError("with cu_seqlens, every row of the batch must start a document (none spans two rows)")
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    starts = torch.repeat_interleave(cu[:-1], cu.diff(), output_size=total)
    return starts.view(batch, length) - torch.arange(0, total, length, device=device)[:, None]


def position_restarts(position_ids: torch.LongTensor, batch_size: int) -> torch.LongTensor | None:
    """Documents packed in rows, found from their position ids by Transformers' own rule (a document starts wherever a
    position is not its predecessor's plus one, `find_packed_sequence_indices`), so that the DSLA layers and the
    softmax layers' masks agree. Returns CPU cu_seqlens over the rows laid end to end, or None if no row is packed."""
    pos = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(starts[:, 1:].any()):
        return None
    cu = starts.flatten().nonzero().squeeze(1).cpu()
    return torch.cat([cu, torch.tensor([pos.numel()])])


def restarts_among_valid(position_ids: torch.LongTensor, mask: torch.Tensor) -> bool:
    """Whether a position goes back (or repeats) between successive unpadded tokens of a row: documents packed in a
    padded batch. Left padding (pads at any position), holes and gaps do not count."""
    pos, valid = position_ids.expand(mask.shape[0], -1), mask.bool()
    seen = torch.where(valid, pos, torch.iinfo(pos.dtype).min).cummax(-1).values
    return bool((valid[:, 1:] & (pos[:, 1:] <= seen[:, :-1])).any())


def tokenwise(fn, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`fn` (token by token, as an MLP or the `lm_head`) over the tokens of several [rows, T, hidden] tensors in one
    call, so its weights are read once; the results [rows, T, out] in the same order."""
    out = fn(torch.cat([t.flatten(0, 1) for t in tensors]))
    parts = out.split([t.shape[0] * t.shape[1] for t in tensors])
    return [part.view(*t.shape[:2], -1) for part, t in zip(parts, tensors)]


def tensors_key(*tensors: torch.Tensor | None) -> tuple:
    """What identifies these tensors' contents for a derived copy kept at inference (a merged LoRA weight, the fused
    step's weights): address, version (bumped by in-place updates) and dtype. A fused optimiser step changes
    weights without bumping versions, so the holders also drop their copies on every forward with gradients."""
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in tensors)


class LowRankDelta(nn.Module):
    """A LoRA-style delta `up(down(x)) * alpha / r` beside a frozen projection; `up` starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.empty(out_features, rank))
        self.scaling = alpha / rank
        self.merged: tuple[tuple, torch.Tensor] | None = None  # (weights' identity and versions, merged weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scaling

    def beside(self, proj: nn.Linear, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`proj(x) + self(x)`. At inference, one product with the merged weight `W + up @ down * scaling` (the
        teacher's `proj` stays untouched): two small matmuls and an add fewer per call, a fifth of a decoding step;
        written into `out` when given (inference; on the MKL path, see `linear`).

        The merged copy is rebuilt when a weight is replaced or changed in place, and dropped by every forward with
        gradients: an optimizer step may change the weights without bumping their version counters (the fused AdamW
        Transformers' Trainer uses by default does not), and a step always follows such a forward."""
        if torch.is_grad_enabled():
            self.merged = None
            return proj(x) + self(x)
        weight = proj.weight
        key = tensors_key(weight, self.down, self.up)
        if self.merged is None or self.merged[0] != key:
            merged = torch.addmm(weight, self.up.to(weight.dtype), self.down.to(weight.dtype), alpha=self.scaling)
            self.merged = (key, merged)
        return linear(x, self.merged[1], proj.bias, out=out)


class DSLAFeatureMap(nn.Module):
    """phi / psi applied per head to keys or queries: identity, elu + 1, or Hedgehog (softmax of a learned map, of
    both signs, which doubles the width)."""

    def __init__(self, kind: str, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.kind = kind
        self.out_dim = 2 * feature_dim if kind == "hedgehog" else head_dim
        if kind == "hedgehog":
            self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return x
        if self.kind == "elu":
            return F.elu(x) + 1.0
        return hedgehog(x, self.weight).to(x.dtype)

    def lazy(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | HedgehogFeatures:
        """The features as kernels take them: Hedgehog features by their inputs and map (computed inside the C++
        CPU kernel, materialised by the others), the other kinds computed here. `mask` [B, T]: 0 where the features
        must be 0."""
        if self.kind == "hedgehog":
            return HedgehogFeatures(x, self.weight, mask)
        features = self(x)
        return features if mask is None else features * mask[:, :, None, None].to(features.dtype)


class DSLAGates(nn.Module):
    """Per-head, per-feature log decays of the states: `logsigmoid(W x + b) / tau`, from the key of each state head
    or from the layer's input hidden state."""

    def __init__(self, config: DSLAConfig, num_heads: int, in_dim: int, feature_dim: int):
        super().__init__()
        self.tau = config.dsla_gate_tau
        self.clamp = config.dsla_gate_clamp
        S = config.dsla_num_states
        self.weight = nn.Parameter(torch.empty(S, num_heads, feature_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(S, num_heads, feature_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> LinearGates:
        """The gates of inputs `x` ([B, T, H, in_dim] keys or [B, T, in_dim] hidden state) as kernels take them:
        computed inside the C++ CPU kernel, materialised by the others (`.materialize()`: fp32 [B, T, S, H, F],
        differentiable). `mask` [B, T]: 0 at padded tokens. A module call, so the model can record them
        (`output_dsla_gates=True`)."""
        return LinearGates(x, self.weight, self.bias, self.tau, self.clamp, mask)


class DSLAAttention(nn.Module):
    """The DSLA parameters of one layer. The default preset borrows the teacher's q/k/v/o projections (keys and
    values frozen and shared, so states can be rebuilt exactly from the KV cache); the paper preset owns copies.

    `teacher`: the layer's softmax attention, whose projections the layer borrows (needed unless
    `config.dsla_train_projections`)."""

    def __init__(self, config: DSLAConfig, layer_idx: int, teacher: LlamaAttention | None = None):
        super().__init__()
        if teacher is None and not config.dsla_train_projections:
            raise ValueError("a DSLA layer that borrows the teacher's projections needs its `teacher` attention")
        self.config = config
        self.layer_idx = layer_idx
        # Borrowed, not registered: as a submodule its projections would take a second name in the state dict.
        # Read at each call, so a projection replaced inside it (an adapter) is the one used.
        object.__setattr__(self, "teacher", teacher)
        # RoPE at any position (folding a KV cache, the window's past tokens, the fused step); inv_freq is a
        # non-persistent buffer, so checkpoints are unchanged.
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_states = config.dsla_num_states
        self.state_heads = self.num_kv_heads if config.dsla_gqa else self.num_heads
        self.normalizer = config.dsla_normalizer
        feature_dim = config.dsla_feature_dim or self.head_dim
        D, H, hidden = self.head_dim, self.num_heads, config.hidden_size

        if config.dsla_train_projections:
            bias = config.attention_bias
            self.q_proj = nn.Linear(hidden, H * D, bias=bias)
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * D, bias=bias)
            self.v_proj = nn.Linear(hidden, self.num_kv_heads * D, bias=bias)
            self.o_proj = nn.Linear(H * D, hidden, bias=bias)
        if config.dsla_lora_rank:
            self.q_lora = LowRankDelta(hidden, H * D, config.dsla_lora_rank, config.dsla_lora_alpha)
            self.o_lora = LowRankDelta(H * D, hidden, config.dsla_lora_rank, config.dsla_lora_alpha)
        self.q_feature_map = DSLAFeatureMap(config.dsla_feature_map, H, D, feature_dim)
        self.k_feature_map = DSLAFeatureMap(config.dsla_feature_map, self.state_heads, D, feature_dim)
        self.feature_dim = self.k_feature_map.out_dim
        gate_in = hidden if config.dsla_gate_source == "hidden" else D
        self.gates = DSLAGates(config, self.state_heads, gate_in, self.feature_dim)
        if self.num_states > 1:
            shape = (self.num_states,) if config.dsla_mixing == "layer" else (H, self.num_states)
            self.mix_logits = nn.Parameter(torch.empty(shape))
        if self.normalizer == "rms":
            self.out_norm = LlamaRMSNorm(D, eps=config.rms_norm_eps)
        self.window = config.dsla_window
        if self.window:
            self.linear_log_scale = nn.Parameter(torch.empty(H))
        # Softmax-normalised features: the normaliser cancels any scale, keep q.k in [0, 2].
        self.scale = 1.0 if config.dsla_feature_map == "hedgehog" else self.feature_dim**-0.5
        self.decode_cache: tuple[tuple, DecodeWeights] | None = None  # see decode_weights

    def reset_dsla_parameters(self) -> None:
        """Initial values of the DSLA parameters (docs/design.md §1). Uses `transformers.initialization`, so weights
        loaded from a checkpoint are left alone."""
        cfg = self.config
        gate = self.gates
        if cfg.dsla_gate_init == "identity_random":
            # The reference code: history weight the identity, recency weight random, no bias.
            init.eye_(gate.weight[0].view(-1, gate.weight.shape[-1]))
            for s in range(1, self.num_states):
                init.normal_(gate.weight[s], std=cfg.initializer_range)
            init.zeros_(gate.bias)
        else:
            # Small weights and biases that set the half-lives: history thousands of tokens, recency tens.
            init.normal_(gate.weight, std=0.01 / math.sqrt(gate.weight.shape[-1]))
            lives = [cfg.dsla_history_half_life, cfg.dsla_recency_half_life][: self.num_states]
            with torch.no_grad():
                values = torch.tensor([half_life_logit(life, cfg.dsla_gate_tau) for life in lives])
            init.copy_(gate.bias, values.view(-1, 1, 1).expand_as(gate.bias).to(gate.bias.dtype))
        for fmap in (self.q_feature_map, self.k_feature_map):
            if fmap.kind == "hedgehog":
                init.copy_(fmap.weight, torch.eye(*fmap.weight.shape[1:]).expand_as(fmap.weight).to(fmap.weight.dtype))
        if self.num_states > 1:
            init.zeros_(self.mix_logits)
        if self.window:
            init.zeros_(self.linear_log_scale)
        if self.normalizer == "rms":
            init.ones_(self.out_norm.weight)
        for lora in (getattr(self, "q_lora", None), getattr(self, "o_lora", None)):
            if lora is not None:
                init.normal_(lora.down, std=lora.down.shape[-1] ** -0.5)
                init.zeros_(lora.up)

    # --- pieces shared by the forward and the fold ----------------------------------------------------------------

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """The q/k/v/o projections the layer runs: its own (paper preset) or the teacher's."""
        owner = self if self.config.dsla_train_projections else self.teacher
        return owner.q_proj, owner.k_proj, owner.v_proj, owner.o_proj

    def mix_weights(self) -> torch.Tensor | None:
        return self.mix_logits.float().softmax(-1) if self.num_states > 1 else None

    def key_side(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        hidden_states: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, LinearGates]:
        """What enters the states: features of the keys, values (with a ones column for the sum normaliser) and the
        log gates. Padded positions (mask 0) contribute nothing and do not decay the states."""
        if self.state_heads != self.num_kv_heads:
            groups = self.num_heads // self.num_kv_heads
            keys = keys.repeat_interleave(groups, dim=2)
            values = values.repeat_interleave(groups, dim=2)
        features = self.k_feature_map.lazy(keys, mask)
        gates = self.gates(keys if self.config.dsla_gate_source == "key" else hidden_states, mask)
        if self.normalizer == "sum":
            shape = (*values.shape[:-1], values.shape[-1] + 1)
            out = scratch("dsla_values", shape, values.device, values.dtype) if self.reusable(values) else None
            values = torch.cat([values, values.new_ones(*shape[:-1], 1)], dim=-1, out=out)
        return features, values, gates

    @staticmethod
    def reusable(x: torch.Tensor) -> bool:
        """Whether this call's intermediates that die within it may live in CPU scratch tensors (inference on the CPU,
        see :func:`~dsla_hf.kernels.scratch`) rather than fresh memory."""
        return x.device.type == "cpu" and not torch.is_grad_enabled()

    def empty_state(self, batch_size: int, device: torch.device) -> torch.Tensor:
        value_dim = self.head_dim + (self.normalizer == "sum")
        shape = (batch_size, self.num_states, self.state_heads, self.feature_dim, value_dim)
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def empty_window(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A window of `dsla_window` null entries (no key, no contribution) for the start of a sequence."""
        shape = (batch, self.window, self.num_kv_heads, self.head_dim)
        return like.new_zeros(shape), like.new_zeros(shape), torch.zeros(batch, self.window, device=like.device)

    def advance(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        doc_start: torch.LongTensor | None = None,
    ):
        """Split raw keys/values of T new tokens into what enters the states now and what stays in the softmax
        window: with a window of W, the states take the W oldest of the W + T pending tokens (the window's and the new
        ones), in order, and the W newest form the next window. Returns (state inputs, pending tokens, next window).

        `doc_start` [B, T] (packed sequences, no cache: see :func:`document_starts`): the state input at token t is the
        key of token t - W, masked out where that token belongs to an earlier document."""
        if not self.window:
            return (keys, values, mask), None, None
        B, T = keys.shape[:2]
        window = window if window is not None else self.empty_window(B, keys)
        state_in, pending, next_window = advance_window(keys, values, mask, window, reuse=self.reusable(keys))
        if doc_start is not None:
            own = torch.arange(-self.window, T - self.window, device=keys.device) >= doc_start
            state_in = (*state_in[:2], state_in[2] * own)
        return state_in, pending, next_window

    def fold(self, cache: DSLACache, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bring the states up to date with keys and values the layer saw as softmax attention: exact for the
        default preset in fp32, and in bf16 within two units of bf16 rounding (2^-7 relative) of the states and
        window the layer would hold had it run as DSLA from the first token. The paper preset cannot rebuild its
        states (its keys and gates are not those of the KV cache): they restart from zero at the switch, as in the
        paper's system. `mask`: the 2-D padding mask over the cache's tokens (None: no padding). Returns the
        layer's states in `cache`."""
        cache_layer = cache.layers[self.layer_idx]
        stale = cache_layer.stale_kv()
        if stale is None:
            return cache_layer.state
        keys, values, start = stale
        batch, _, count, _ = keys.shape
        window = None
        if not self.config.foldable:
            logger.warning_once(
                "The paper preset cannot fold a KV cache into DSLA states; switched layers forget earlier tokens."
            )
            state = self.empty_state(batch, keys.device)
        else:
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)
            # RoPE undone in fp32 (its cos and sin too), then back to the dtype the layer's own keys have: in bf16
            # the folded keys are then the layer's keys up to the one rounding of the rotated keys in the KV cache.
            raw = keys.float()
            cos, sin = self.rotary_emb(raw, cache.past_positions(start, start + count))
            keys = undo_rotary(raw, cos, sin).to(values.dtype)
            past_mask = mask[:, start : start + count] if mask is not None else None
            (keys, values, past_mask), _, window = self.advance(keys, values, past_mask, cache_layer.window)
            features, values, gates = self.key_side(keys, values, None, past_mask)
            state = fold_kv(feature_tensor(features), values, gates, initial_state=cache_layer.state)
        cache_layer.set_state(state, 0, window)
        if not cache_layer.keep_kv:
            cache_layer.free_kv()
        return state

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: DSLACache | None = None,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """The layer's output on `hidden_states` [B, T, hidden] (its attention input), `o_proj` included.

        `padding_mask` [B, past + T]: 0 at padded tokens. `cu_seqlens` (training and scoring, no cache): documents
        packed in the rows, as LongTensor boundaries over the B * T tokens laid end to end (every row starts a
        document; a batch of one row is flash attention's `cu_seq_lens`). Each document then runs as if alone: its
        states start empty, the states take none of an earlier document's keys and the window sees none of its
        tokens; `position_embeddings` give each token its position in its document. Refused with a cache: a packed
        row cannot be continued."""
        B, T, _ = hidden_states.shape
        D = self.head_dim
        if torch.is_grad_enabled():
            self.decode_cache = None  # see decode_weights
        q_proj, k_proj, v_proj, o_proj = self.projections()
        q = self.query_projection(q_proj, hidden_states).view(B, T, self.num_heads, D)
        k = k_proj(hidden_states).view(B, T, self.num_kv_heads, D)
        v = v_proj(hidden_states).view(B, T, self.num_kv_heads, D)

        cache_layer = cache.layers[self.layer_idx] if cache is not None else None
        doc_start = None
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("packed sequences (cu_seqlens) are for runs without a cache: a packed row cannot be "
                                 "continued; pass use_cache=False, or one row per sequence")  # fmt: skip
            doc_start = document_starts(cu_seqlens, B, T, hidden_states.device)
        state = self.fold(cache, padding_mask) if cache_layer else None
        mask = padding_mask[:, -T:] if padding_mask is not None else None
        backend = self.fused_decode_backend(q) if T == 1 and state is not None else None
        if backend is not None:
            o = self.fused_step(q, k, v, state, cache, mask, position_embeddings, backend)
            return self.output_projection(o.reshape(B, T, self.num_heads * D), o_proj)
        window = cache_layer.window if cache_layer is not None else None
        (state_k, state_v, state_mask), pending, window = self.advance(k, v, mask, window, doc_start)
        state_q, state_x = q, hidden_states
        if cu_seqlens is not None and B > 1:  # the kernels take packed rows as one row of B * T tokens
            rows = lambda x: None if x is None else x.reshape(1, B * T, *x.shape[2:])
            state_q, state_x, state_k, state_v = rows(q), rows(hidden_states), rows(state_k), rows(state_v)
            state_mask = rows(state_mask)
        features, values, gates = self.key_side(state_k, state_v, state_x, state_mask)
        queries = self.q_feature_map.lazy(state_q)
        mix = self.mix_weights()

        if cache_layer is not None and state is not None and T <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled():
            queries, features = feature_tensor(queries), feature_tensor(features)
            o, state = fused_recurrent_dsla(
                queries, features, values, gates, mix, self.scale, initial_state=state, inplace=True
            )
        else:
            out = self.output_over_queries(queries, state_q, values.shape[-1])
            o, state = chunk_dsla(
                queries, features, values, gates, mix, self.scale, state,
                output_final_state=cache_layer is not None, cu_seqlens=cu_seqlens, out=out,
            )  # fmt: skip
            if state_q is not q:
                o = o.view(B, T, *o.shape[2:])
        if cache_layer is not None:
            cache_layer.set_state(state, T, window)
            self.keep_kv(cache_layer, k, v, position_embeddings)

        if self.window:
            cos, sin = self.pending_rope(cache, T, position_embeddings)
            doc_start = None if doc_start is None else doc_start + self.window  # as pending indices
            out = q if not torch.is_grad_enabled() and q.dtype == torch.float32 else None  # nothing reads q after
            o = window_attention(q, *pending, cos, sin, o, self.linear_log_scale, doc_start=doc_start, out=out)
            o = o.to(hidden_states.dtype)
        elif self.normalizer == "sum":
            o = o[..., :D] / (o[..., D:].float() + 1e-6).to(o.dtype)
        elif self.normalizer == "rms":
            o = self.out_norm(o)
        return self.output_projection(o.reshape(B, T, self.num_heads * D), o_proj)

    def query_projection(self, q_proj: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
        """The queries, with the LoRA delta merged at inference. Nothing reads them after the forward (the window's
        output overlays them), so on the CPU they go into a scratch tensor there: no fresh memory for a long prompt."""
        if not hasattr(self, "q_lora"):
            return q_proj(hidden_states)
        out = None
        if self.reusable(hidden_states) and hidden_states.dtype == q_proj.weight.dtype:
            shape = (*hidden_states.shape[:-1], q_proj.weight.shape[0])
            out = scratch("dsla_queries", shape, hidden_states.device, hidden_states.dtype)
        return self.q_lora.beside(q_proj, hidden_states, out=out)

    def output_projection(self, o: torch.Tensor, o_proj: nn.Linear) -> torch.Tensor:
        return self.o_lora.beside(o_proj, o) if hasattr(self, "o_lora") else o_proj(o)

    def fused_decode_backend(self, q: torch.Tensor) -> str | None:
        """The backend a one-token step runs on as one fused kernel call (:func:`fused_decode_dsla`), or None:
        inference with a default-preset layer (Hedgehog features, gates from the key, sum normaliser, GQA states)
        where a fused backend exists (the C++ kernel on CPUs, fp32; Triton on CUDA)."""
        cfg = self.config
        layout = (cfg.dsla_feature_map, self.normalizer, cfg.dsla_gate_source) == ("hedgehog", "sum", "key")
        if torch.is_grad_enabled() or not layout or self.state_heads != self.num_kv_heads:
            return None
        backend = decode_backend(q.device)
        return backend if backend == "triton" or backend == "cpp" and q.dtype == torch.float32 else None

    def fused_step(self, q, k, v, state, cache: DSLACache, mask, position_embeddings, backend: str) -> torch.Tensor:
        """One token through the fused decoding kernel; the states and the window are updated in place."""
        B = q.shape[0]
        cache_layer = cache.layers[self.layer_idx]
        window, positions = None, None
        if self.window:
            window = cache_layer.window or self.empty_window(B, k)
            window = tuple(t.contiguous() for t in window)  # after a prefill, views of a larger tensor: once
            positions = self.pending_positions(cache, cache_layer.seen_tokens + 1, 1)
        mask = None if mask is None else mask[:, 0]
        state = state if state.is_contiguous() else state.contiguous()  # updated in place: once, then kept
        weights = self.decode_weights()
        o = fused_decode_dsla(q[:, 0], k[:, 0], v[:, 0], state, weights, window, positions, mask, backend=backend)
        cache_layer.set_state(state, 1, window)
        self.keep_kv(cache_layer, k, v, position_embeddings)
        return o

    def decode_weights(self) -> DecodeWeights:
        """The fused step's weights, made (and checked) once and kept while the parameters are unchanged: an in-place
        update (``load_state_dict``) bumps a tensor's version, a moved one has a new address, and every forward with
        gradients drops them (a fused optimiser step changes weights without bumping their versions)."""
        tensors = (self.q_feature_map.weight, self.k_feature_map.weight, self.gates.weight, self.gates.bias,
                   getattr(self, "mix_logits", None), getattr(self, "linear_log_scale", None),
                   self.rotary_emb.inv_freq)  # fmt: skip
        key = (*tensors_key(*tensors), self.gates.tau, self.gates.clamp, self.rotary_emb.attention_scaling)
        if self.decode_cache is None or self.decode_cache[0] != key:
            weights = DecodeWeights(
                q_map=self.q_feature_map.weight, k_map=self.k_feature_map.weight, gate_weight=self.gates.weight,
                gate_bias=self.gates.bias, tau=self.gates.tau, clamp=self.gates.clamp, mix=self.mix_weights(),
                scale=self.scale, window_log_scale=getattr(self, "linear_log_scale", None),
                inv_freq=self.rotary_emb.inv_freq, rope_scale=self.rotary_emb.attention_scaling,
            )  # fmt: skip
            self.decode_cache = (key, weights)
        return self.decode_cache[1]

    @staticmethod
    def keep_kv(cache_layer: DSLACacheLayer, k: torch.Tensor, v: torch.Tensor, position_embeddings) -> None:
        """Keep the new keys (rotated, as softmax attention caches them) and values where reverts must be exact."""
        if cache_layer.keep_kv:
            cos, sin = position_embeddings
            k_rot = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[1]
            cache_layer.append_kv(k_rot, v.transpose(1, 2))

    def output_over_queries(self, queries: torch.Tensor, q: torch.Tensor, value_dim: int) -> torch.Tensor | None:
        """Where the prefill's output goes at inference, when nothing but this forward reads it: over the query
        features row for row where they are a tensor nothing reads after, else (features computed inside the kernel)
        a CPU scratch tensor reused by every layer and call. A long prompt's output then takes no fresh memory,
        whose page faults are a quarter of the C++ kernel's time at 16k tokens. None where neither can be used."""
        if torch.is_grad_enabled() or q.dtype != torch.float32:
            return None
        if not isinstance(queries, torch.Tensor):
            reusable = self.reusable(q)
            return scratch("dsla_states_output", (*q.shape[:3], value_dim), q.device) if reusable else None
        if queries.dtype != torch.float32 or queries.shape[-1] < value_dim:
            return None
        if queries is q and self.window:  # the window attention reads the raw queries after
            return None
        return queries[..., :value_dim]

    def pending_rope(self, cache: DSLACache | None, T: int, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of the W + T pending tokens: the window's W past positions (from the cache, after this step's
        update; null entries without one), then the new tokens' own tables (per document when packed), which the
        model has computed already (recomputing them took 3 ms of a 16k-token prefill)."""
        cos, sin = position_embeddings
        if cache is None:
            return F.pad(cos, (0, 0, self.window, 0)), F.pad(sin, (0, 0, self.window, 0))
        past = self.pending_positions(cache, cache.layers[self.layer_idx].seen_tokens - T, 0)
        past_cos, past_sin = self.rotary_emb(cos, past)
        rows = past.shape[0]
        return torch.cat([past_cos, cos.expand(rows, -1, -1)], 1), torch.cat([past_sin, sin.expand(rows, -1, -1)], 1)

    def pending_positions(self, cache: DSLACache, seen: int, T: int) -> torch.LongTensor:
        """Positions of the W + T pending tokens (the window's, then the new ones) from the cache; 0 for null entries.
        `seen`: the tokens the layer has seen, the T new ones included. (Without a cache, the forward pads the new
        tokens' own position embeddings instead.)"""
        start = seen - T - self.window
        positions = cache.position_ids[:, max(0, start) : seen]
        return F.pad(positions, (max(0, -start), 0))


class DSLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DSLAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.linear_attn = None
        if layer_idx in config.dsla_layers:
            self.linear_attn = DSLAAttention(config, layer_idx, teacher=self.self_attn)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """The whole layer: `attend` (its keyword arguments), then `feed_forward`."""
        return self.feed_forward(self.attend(hidden_states, **kwargs))

    def attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DSLACache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        as_dsla: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The attention half of the layer, residual included: DSLA or softmax attention, as the layer runs now
        (`as_dsla` None) or as asked (a request of its own kinds, in `forward_groups`)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.layer_type == LINEAR_ATTENTION if as_dsla is None else as_dsla:
            hidden_states = self.linear_attn(
                hidden_states=hidden_states,
                position_embeddings=position_embeddings,
                cache=cache,
                padding_mask=padding_mask,
                cu_seqlens=cu_seqlens,
            )
        else:
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return residual + hidden_states

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MLP half of the layer, residual included (token by token: any tokens can go through it together)."""
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


@dataclass
class SequenceGroup:
    """Rows that share one cache, for :meth:`DSLALlamaForCausalLM.forward_groups`: `input_ids` [rows, T],
    `attention_mask` (2-D padding mask over past and new tokens, or None), `position_ids` [rows, T] (default: after
    the cache's tokens), the positions whose logits are wanted (the last `logits_to_keep`; 0: all), and the layers
    these rows run as DSLA (`dsla_layers`; None: the model's current ones), so groups of different kinds run in one
    forward (the paper's mixed batches)."""

    input_ids: torch.LongTensor
    cache: DSLACache
    attention_mask: torch.Tensor | None = None
    position_ids: torch.LongTensor | None = None
    logits_to_keep: int = 1
    dsla_layers: tuple[int, ...] | None = None


@dataclass
class DSLAModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus what distillation reads, each recorded on request (`output_<name>=True`):

    - `attention_inputs`: every layer's attention input (after its input norm), in layer order;
    - `dsla_attentions`: the attention output of every layer that ran as DSLA, in layer order;
    - `dsla_gates`: the gates of those layers (`LinearGates`; `.materialize()` gives the differentiable log decays).
    """

    attention_inputs: tuple[torch.Tensor, ...] | None = None
    dsla_attentions: tuple[torch.Tensor, ...] | None = None
    dsla_gates: tuple[LinearGates, ...] | None = None


@dataclass
class DSLACausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the recorded outputs of :class:`DSLAModelOutputWithPast`."""

    attention_inputs: tuple[torch.Tensor, ...] | None = None
    dsla_attentions: tuple[torch.Tensor, ...] | None = None
    dsla_gates: tuple[LinearGates, ...] | None = None


RECORDED = ("attention_inputs", "dsla_attentions", "dsla_gates")


class DSLAPreTrainedModel(PreTrainedModel):
    config_class = DSLAConfig
    config: DSLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DSLADecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _is_stateful = True
    # Outputs recorded by Transformers' output capturing (`output_hidden_states=True`, `output_dsla_gates=True`, ...)
    _can_record_outputs = {
        "hidden_states": DSLADecoderLayer,
        "attentions": OutputRecorder(LlamaAttention, index=1),
        "attention_inputs": OutputRecorder(LlamaRMSNorm, layer_name="input_layernorm"),
        "dsla_attentions": DSLAAttention,
        "dsla_gates": DSLAGates,
    }

    def post_init(self):
        super().post_init()
        use_fast_linears(self)  # oneDNN projections on CPUs where MKL would run narrower code (training too)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DSLAAttention):
            module.reset_dsla_parameters()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual (safetensors), plus self-contained remote code and its `auto_map`, so the folder also loads
        with `trust_remote_code=True` where dsla_hf is not installed."""
        self.config.auto_map = dict(AUTO_MAP)
        cls = type(self)
        auto_class = cls._auto_class
        cls._auto_class = None  # Transformers' exporter cannot follow the kernels sub-package: we write it
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            cls._auto_class = auto_class
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)
        return result

    def set_dsla_layers(
        self,
        layers: list[int] | tuple[int, ...] | float | None,
        caches: Sequence[DSLACache | tuple[DSLACache, torch.Tensor | None]] = (),
    ) -> list[int]:
        """Run the given layers (indices, or a ratio: a prefix of `config.conversion_order`) as DSLA and every
        other layer as softmax attention. Changes no weight and loads nothing; returns the DSLA layers.

        `caches`: caches in flight (each alone, or with its 2-D padding mask) whose newly converted layers are
        folded now (:meth:`fold_caches`) rather than at their next forward, so that every cache holds the same kind
        of state per layer (as joining caches needs). Reverting a layer needs its keys and values: ask
        `cache.can_revert(layers)` first."""
        before = set(self.config.active_dsla_layers)
        active = self.config.layers_for(layers)
        self.config.layer_types = [
            LINEAR_ATTENTION if i in active else FULL_ATTENTION for i in range(self.config.num_hidden_layers)
        ]
        for module in self.modules():
            if isinstance(module, DSLADecoderLayer):
                module.layer_type = self.config.layer_types[module.layer_idx]
        converted = [i for i in active if i not in before]
        if converted and caches:
            self.fold_caches(caches, converted)
        return active

    def fold_caches(
        self, caches: Sequence[DSLACache | tuple[DSLACache, torch.Tensor | None]], layers: list[int]
    ) -> None:
        """Fold the keys and values that `layers` of each cache hold into those layers' DSLA states (exact for the
        default preset) and free them unless the cache keeps them: what those layers' next forward would do."""
        model = self.base_model
        for entry in caches:
            cache, mask = entry if isinstance(entry, tuple) else (entry, None)
            padding = mask if mask is not None and not bool(mask.all()) else None
            for i in layers:
                attention = model.layers[i].linear_attn
                if attention is not None and cache.get_seq_length(i):
                    attention.fold(cache=cache, mask=padding)

    @property
    def dsla_layers(self) -> list[int]:
        """The layers that currently run as DSLA."""
        return self.config.active_dsla_layers


class DSLALlamaModel(DSLAPreTrainedModel):
    def __init__(self, config: DSLAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DSLADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DSLACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> DSLAModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        padded = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not attention_mask.all()
        cu_seqlens = None
        if self.config.active_dsla_layers:
            announce_kernels(inputs_embeds.device)
            cu_seqlens, attention_mask, position_ids = self.packed_documents(
                inputs_embeds, attention_mask, padded, position_ids, cache, use_cache, kwargs
            )
            if cu_seqlens is not None:
                use_cache = False
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DSLACache(self.config)
        if cache is not None and not isinstance(cache, DSLACache):
            raise TypeError(
                f"DSLA models need a `DSLACache` (got {type(cache).__name__}): create one with "
                "`DSLACache(model.config)`, or let the model or `generate()` create it."
            )
        inputs = self.layer_inputs(inputs_embeds, attention_mask, position_ids, cache, padded)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, use_cache=use_cache, cu_seqlens=cu_seqlens, **inputs, **kwargs)
        hidden_states = self.norm(hidden_states)
        return DSLAModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)

    def layer_inputs(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: DSLACache | None,
        padded: bool,
    ) -> dict:
        """What each decoder layer takes beside the hidden states, for rows sharing `cache`; their positions are
        recorded in it (a fold needs them to undo RoPE on cached keys)."""
        batch_size, length = inputs_embeds.shape[:2]
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(length, device=inputs_embeds.device).unsqueeze(0) + past_seen
        if cache is not None:
            cache.record_positions(position_ids, batch_size)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        return dict(
            attention_mask=causal_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids=position_ids),
            # DSLA layers read padding from the 2-D mask (past and current tokens); None when nothing is padded.
            padding_mask=attention_mask if padded else None,
        )

    def forward_groups(self, groups: list[SequenceGroup]) -> list[torch.Tensor]:
        """One forward over groups of rows that each have their own cache (a server's step: the running batch's
        decode tokens and prompt chunks of other requests). Attention runs group by group; the norms and MLPs run
        once over the tokens of all groups, so a step reads their weights once. Returns each group's hidden states
        after the final norm, [rows, T, hidden]. Nothing is recorded (see `forward` for outputs)."""
        if not groups:
            raise ValueError("forward_groups needs at least one group")
        hidden, inputs, kinds = [], [], []
        for group in groups:
            if not isinstance(group.cache, DSLACache) or group.input_ids.dim() != 2:
                raise ValueError("Each group needs input_ids [rows, tokens] and its own DSLACache")
            layers = self.config.active_dsla_layers if group.dsla_layers is None else group.dsla_layers
            if not set(layers) <= set(self.config.dsla_layers):
                raise ValueError(f"Layers {sorted(set(layers) - set(self.config.dsla_layers))} have no DSLA weights")
            embeds = self.embed_tokens(group.input_ids)
            mask = group.attention_mask
            padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.all()
            if layers:
                announce_kernels(embeds.device)
                self.packed_documents(embeds, mask, padded, group.position_ids, group.cache, True, {})  # refusals
            hidden.append(embeds)
            inputs.append(self.layer_inputs(embeds, mask, group.position_ids, group.cache, padded))
            kinds.append(set(layers))
        for i, layer in enumerate(self.layers):
            attended = [
                layer.attend(h, use_cache=True, as_dsla=i in dsla, **kw) for h, kw, dsla in zip(hidden, inputs, kinds)
            ]
            hidden = tokenwise(layer.feed_forward, attended)
        return [self.norm(h) for h in hidden]

    def packed_documents(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        padded: bool,
        position_ids: torch.LongTensor | None,
        cache: DSLACache | None,
        use_cache: bool | None,
        kwargs: dict,
    ) -> tuple[torch.LongTensor | None, torch.Tensor | None, torch.LongTensor | None]:
        """What the DSLA layers need to know of the documents packed in the rows, and the inputs they cannot honour
        refused (a ValueError), since a mask the DSLA layers skipped would silently mix documents or padding.

        Documents come from flash attention's `cu_seq_lens_q` / `cu_seq_lens_k` (a batch of one row) if given, else
        from `position_ids` that restart inside a row (any batch size; Transformers' rule, which the softmax layers'
        masks follow). Packing is for runs without a cache (training, scoring): with a cache, or `use_cache=True`,
        it is refused; with `use_cache` unset no cache is made. Also refused: masks other than a 2-D padding mask,
        and padding together with packing (Transformers' masks ignore packing under a padding mask).

        Returns `(cu_seqlens, attention_mask, position_ids)`: CPU boundaries over the rows laid end to end (None when
        nothing is packed); an all-ones mask dropped when packed, so the softmax layers' masks find the documents;
        position ids derived from `cu_seq_lens_q` when none were given."""
        B, T = inputs_embeds.shape[:2]
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else "custom"
            raise ValueError(
                f"An attention mask of shape {shape} cannot be honoured by the DSLA layers "
                f"{self.config.active_dsla_layers}: they take a 2-D padding mask [batch, past + new tokens], and "
                "packed documents from position_ids that restart at 0 (or cu_seq_lens_q/cu_seq_lens_k). Pass one of "
                "those, or run those layers as softmax attention (set_dsla_layers) for custom masks."
            )
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        cu_seqlens = None
        if cu_q is not None or cu_k is not None:
            given = cu_q if cu_q is not None else cu_k
            cu_seqlens = given.to("cpu", torch.long)
            if cu_q is not None and cu_k is not None and not torch.equal(cu_seqlens, cu_k.to("cpu", torch.long)):
                raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: DSLA layers attend within the same tokens")
            bounds = cu_seqlens.tolist()
            if B != 1 or cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T:
                raise ValueError(f"cu_seq_lens_q must run from 0 to the row's {T} tokens, for a batch of one row "
                                 f"(got {bounds} for a batch of {B})")  # fmt: skip
            if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
                raise ValueError(f"cu_seq_lens_q must be strictly increasing, got {bounds}")
            if position_ids is None:  # each document's own positions, which the softmax layers' masks read
                starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens.diff(), output_size=T)
                position_ids = (torch.arange(T) - starts)[None].to(inputs_embeds.device)
            else:
                found = position_restarts(position_ids, 1) if T > 1 else None
                if not torch.equal(found if found is not None else torch.tensor([0, T]), cu_seqlens):
                    raise ValueError(
                        "cu_seq_lens_q and position_ids describe different documents (a document starts where a "
                        "position is not the previous one plus one): the softmax layers' masks follow position_ids"
                    )
            if len(bounds) == 2:
                cu_seqlens = None  # one document: nothing packed
        elif position_ids is not None and T > 1:
            if not padded:
                cu_seqlens = position_restarts(position_ids, B)
            elif restarts_among_valid(position_ids, attention_mask[:, -T:]):
                raise ValueError(
                    "position_ids restart inside rows that are also padded: packed documents and padding together "
                    "are not supported (the softmax layers' masks ignore packing under a padding mask). Pack without "
                    "padding (no attention_mask, e.g. DataCollatorWithFlattening) or pad without packing."
                )
        if cu_seqlens is None:
            return None, attention_mask, position_ids
        if padded:
            raise ValueError("cu_seq_lens_q with a padding mask is not supported: packed rows have no padding")
        if cache is not None or use_cache:
            raise ValueError(
                "Packed documents (position_ids restarting inside a row, or cu_seq_lens_q) are for runs without a "
                "cache (training, scoring): a packed row cannot be continued. Pass use_cache=False and no cache."
            )
        return cu_seqlens, None, position_ids

    def softmax_attention(
        self,
        layer_idx: int,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Layer `layer_idx`'s softmax attention (the teacher's) on attention inputs `hidden_states` [B, T, hidden],
        no cache: the target a DSLA layer is aligned to. `attention_mask` and `position_ids` as for `forward`
        (padding, packed sequences)."""
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=None,
            position_ids=position_ids,
        )  # fmt: skip
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        attention = self.layers[layer_idx].self_attn
        return attention(hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=mask)[0]


class DSLALlamaForCausalLM(DSLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DSLAConfig):
        super().__init__(config)
        self.model = DSLALlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would build a plain DynamicCache; DSLA layers need the hybrid one.
        if (
            model_kwargs.get("cache") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        ):
            model_kwargs["cache"] = DSLACache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward_groups(self, groups: list[SequenceGroup]) -> list[torch.Tensor]:
        """Logits of each group's last `logits_to_keep` positions, [rows, kept, vocab], from one forward over all
        groups (:meth:`DSLALlamaModel.forward_groups`) and one `lm_head` product over what every group keeps."""
        hidden = self.model.forward_groups(groups)
        kept = [h[:, -g.logits_to_keep :] if g.logits_to_keep else h for h, g in zip(hidden, groups)]
        return tokenwise(self.lm_head, kept)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DSLACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DSLACausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return DSLACausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{name: getattr(outputs, name) for name in RECORDED},
        )


__all__ = [
    "DSLACausalLMOutputWithPast",
    "DSLAModelOutputWithPast",
    "DSLAAttention",
    "DSLADecoderLayer",
    "DSLALlamaForCausalLM",
    "DSLALlamaModel",
    "DSLAPreTrainedModel",
    "SequenceGroup",
]
