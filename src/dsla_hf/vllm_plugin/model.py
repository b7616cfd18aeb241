"""The vLLM model of a DSLA checkpoint: vLLM's Llama, with its DSLA layers as vLLM state layers.

Softmax layers are vLLM's own (`LlamaAttention`: fused QKV, paged KV cache, its attention backend). A DSLA layer
(`DSLAStateAttention`, default preset) takes the same place in vLLM's `LlamaDecoderLayer` and keeps one page per
request: both states with the normaliser column, fp32 [S, HK, 2F, D + 1], and the softmax window of raw keys and
values [W, HK, D] with its validity [W], oldest first, as the Transformers model's cache holds them. Prefill chunks
run sequence by sequence on `chunk_dsla` (or the recurrent kernel for a few tokens) and `window_attention`, decodes
all at once on `fused_decode_dsla`: the computation of `DSLALlamaForCausalLM` with a cache, kernel for kernel.
LoRA deltas are merged into the projections after loading, as the Transformers model merges them at inference.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, extract_layer_index, maybe_prefix
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..kernels import (
    RECURRENT_MAX_TOKENS,
    DecodeWeights,
    HedgehogFeatures,
    LinearGates,
    advance_window,
    chunk_dsla,
    feature_tensor,
    fused_decode_dsla,
    fused_recurrent_dsla,
    window_attention,
)
from ..kernels.decode import rope_tables
from ..models.dsla.configuration_dsla import DSLAConfig


def dsla_layers(config: DSLAConfig) -> list[int]:
    """The layers served as DSLA: the first `dsla_ratio` of `conversion_order` when given (``--hf-overrides
    '{"dsla_ratio": 0.5}'``), else the checkpoint's `layer_types`."""
    ratio = getattr(config, "dsla_ratio", None)
    if ratio is not None:
        return config.layers_for(float(ratio))
    return config.active_dsla_layers


def check_servable(config: DSLAConfig) -> None:
    """What the plugin serves: the default preset on one device; a clear refusal of anything else."""
    layout = (config.dsla_feature_map, config.dsla_normalizer, config.dsla_gate_source, config.dsla_gqa)
    if layout != ("hedgehog", "sum", "key", True) or config.dsla_train_projections:
        raise ValueError(
            "the vLLM plugin serves DSLA checkpoints of the default preset (Hedgehog features, gates from the key, "
            f"sum normaliser, GQA states, shared projections); this one has {layout} and train_projections="
            f"{config.dsla_train_projections}. Serve it with `dsla serve`."
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"the vLLM plugin's DSLA layers take the default RoPE only, not {rope.get('rope_type')!r}")
    if get_tensor_model_parallel_world_size() != 1:
        raise ValueError("the vLLM plugin's DSLA layers run on one device: pass --tensor-parallel-size 1")


def rope_inv_freq(config: DSLAConfig, head_dim: int) -> torch.Tensor:
    """Llama's default RoPE frequencies, computed as Transformers computes them."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def state_shapes(config: DSLAConfig) -> tuple[tuple[int, ...], ...]:
    """Per request and DSLA layer: the states [S, HK, 2F, D + 1] and, with a window, its keys and values
    [W, HK, D] and validity [W]."""
    D, HK, W = config.head_dim, config.num_key_value_heads, config.dsla_window
    F = config.dsla_feature_dim or D
    shapes: tuple[tuple[int, ...], ...] = ((config.dsla_num_states, HK, 2 * F, D + 1),)
    if W:
        shapes += ((W, HK, D), (W, HK, D), (W,))
    return shapes


def _parameters(**shapes: tuple[int, ...]) -> nn.Module:
    """A module holding parameters of the given shapes, under the checkpoint's names (loaded, then used raw)."""
    module = nn.Module()
    for name, shape in shapes.items():
        module.register_parameter(name, nn.Parameter(torch.empty(shape), requires_grad=False))
    return module


class DSLAStateAttention(nn.Module, MambaBase):
    """One default-preset DSLA layer as a vLLM state layer. It takes the constructor and forward of vLLM's
    `LlamaAttention`, so that `LlamaDecoderLayer` hosts it in place of softmax attention."""

    def __init__(
        self,
        config: DSLAConfig,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config=None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config=None,
        prefix: str = "",
        attn_type: str | None = None,
    ) -> None:
        super().__init__()  # the config was checked by DSLAForCausalLM (check_servable)
        self.prefix, self.layer_idx = prefix, extract_layer_index(prefix)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = D = config.head_dim
        self.window, self.num_states = config.dsla_window, config.dsla_num_states
        self.model_config = get_current_vllm_config().model_config
        S, H, HK, F = self.num_states, num_heads, num_kv_heads, config.dsla_feature_dim or D
        self.qkv_proj = QKVParallelLinear(hidden_size=hidden_size, head_size=D, total_num_heads=H,
                                          total_num_kv_heads=HK, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")  # fmt: skip
        self.o_proj = RowParallelLinear(input_size=H * D, output_size=hidden_size, bias=bias_o_proj,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")  # fmt: skip
        # The checkpoint's DSLA parameters (its `linear_attn.*`), by their names there.
        self.q_feature_map = _parameters(weight=(H, D, F))
        self.k_feature_map = _parameters(weight=(HK, D, F))
        self.gates = _parameters(weight=(S, HK, 2 * F, D), bias=(S, HK, 2 * F))
        self.tau, self.clamp = config.dsla_gate_tau, config.dsla_gate_clamp
        if S > 1:
            shape = (S,) if config.dsla_mixing == "layer" else (H, S)
            self.mix_logits = nn.Parameter(torch.empty(shape), requires_grad=False)
        if self.window:
            self.linear_log_scale = nn.Parameter(torch.empty(H), requires_grad=False)
        self.lora_scaling = None
        if config.dsla_lora_rank:
            r = config.dsla_lora_rank
            self.q_lora = _parameters(down=(r, hidden_size), up=(H * D, r))
            self.o_lora = _parameters(down=(r, H * D), up=(hidden_size, r))
            self.lora_scaling = config.dsla_lora_alpha / r
        self.register_buffer("inv_freq", rope_inv_freq(config, D), persistent=False)
        self.weights: DecodeWeights | None = None  # made once the checkpoint is loaded (merge_after_loading)
        compilation = get_current_vllm_config().compilation_config
        if prefix in compilation.static_forward_context:
            raise ValueError(f"duplicate layer name {prefix}")
        compilation.static_forward_context[prefix] = self

    # --- vLLM's state-layer interface --------------------------------------------------------------------------

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR  # its metadata: query_start_loc, seq_lens, one state page each

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return state_shapes(self.model_config.hf_config)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,) * len(self.get_state_shape())

    # --- weights ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge_after_loading(self) -> None:
        """The LoRA deltas merged into the projections (`W + up @ down * scaling`, as the Transformers model merges
        them at inference), and the fused step's weights made once."""
        if self.lora_scaling is not None:
            q_rows = self.qkv_proj.weight[: self.num_heads * self.head_dim]
            dtype = q_rows.dtype
            q_rows.copy_(torch.addmm(q_rows, self.q_lora.up.to(dtype), self.q_lora.down.to(dtype),
                                     alpha=self.lora_scaling))  # fmt: skip
            o = self.o_proj.weight
            o.copy_(torch.addmm(o, self.o_lora.up.to(o.dtype), self.o_lora.down.to(o.dtype), alpha=self.lora_scaling))
        mix = self.mix_logits.float().softmax(-1) if self.num_states > 1 else None
        self.weights = DecodeWeights(
            q_map=self.q_feature_map.weight, k_map=self.k_feature_map.weight, gate_weight=self.gates.weight,
            gate_bias=self.gates.bias, tau=self.tau, clamp=self.clamp, mix=mix, scale=1.0,
            window_log_scale=getattr(self, "linear_log_scale", None), inv_freq=self.inv_freq, rope_scale=1.0,
        )  # fmt: skip

    # --- forward --------------------------------------------------------------------------------------------------

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        output = torch.empty_like(hidden_states)
        torch.ops.vllm.dsla_attention(hidden_states, output, positions, self.prefix)
        return output

    def run(self, hidden_states: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> None:
        """The layer on a step's tokens (decodes first, then prefill chunks, as vLLM orders them), `o_proj`
        included, into `output`."""
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # a profiling run: shapes only
            output.zero_()
            return
        n = metadata.num_decode_tokens + metadata.num_prefill_tokens
        H, HK, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv, _ = self.qkv_proj(hidden_states[:n])
        q, k, v = qkv.split([H * D, HK * D, HK * D], dim=-1)
        q, k, v = q.view(n, H, D), k.view(n, HK, D), v.view(n, HK, D)
        o = torch.empty(n, H, D, dtype=q.dtype, device=q.device)
        slots = metadata.state_indices_tensor
        decodes = metadata.num_decodes
        if decodes:
            o[:decodes] = self.decode(q[:decodes], k[:decodes], v[:decodes], positions[:decodes], slots[:decodes])
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        for r in range(decodes, decodes + metadata.num_prefills):
            a, b = starts[r], starts[r + 1]
            context = seq_lens[r] - (b - a)
            o[a:b] = self.prefill(q[a:b], k[a:b], v[a:b], context, int(slots[r]))
        out, _ = self.o_proj(o.view(n, H * D))
        output[:n] = out

    def decode(self, q, k, v, positions, slots) -> torch.Tensor:
        """One token of each decoding request on the fused step, its page read and written back."""
        cache = self.kv_cache
        state = cache[0][slots]
        window, pending = None, None
        if self.window:
            window = tuple(t[slots] for t in cache[1:])
            offsets = torch.arange(-self.window, 1, device=positions.device)
            pending = (positions[:, None].long() + offsets).clamp(min=0)  # the window's positions, then the new one
        o = fused_decode_dsla(q, k, v, state, self.weights, window, pending)
        cache[0][slots] = state
        if window is not None:
            for page, moved in zip(cache[1:], window):
                page[slots] = moved
        return o

    def prefill(self, q, k, v, context: int, slot: int) -> torch.Tensor:
        """A prefill chunk of one request after `context` tokens, as the Transformers layer runs it with a cache."""
        T, W, D = q.shape[0], self.window, self.head_dim
        q, k, v = q[None], k[None], v[None]
        cache = self.kv_cache
        state = None if context == 0 else cache[0][slot][None].clone()
        if W:
            if context == 0:
                window = (k.new_zeros(1, W, *k.shape[2:]), v.new_zeros(1, W, *v.shape[2:]), k.new_zeros(1, W))
            else:
                window = tuple(t[slot][None] for t in cache[1:])
            (state_k, state_v, state_mask), pending, next_window = advance_window(k, v, None, window)
        else:
            state_k, state_v, state_mask = k, v, None
        w = self.weights
        features = HedgehogFeatures(state_k, w.k_map, state_mask)
        values = torch.cat([state_v, state_v.new_ones(*state_v.shape[:-1], 1)], dim=-1)
        gates = LinearGates(state_k, w.gate_weight, w.gate_bias, w.tau, w.clamp, state_mask)
        queries = HedgehogFeatures(q, w.q_map)
        if state is not None and T <= RECURRENT_MAX_TOKENS:
            lin, state = fused_recurrent_dsla(feature_tensor(queries), feature_tensor(features), values, gates,
                                              w.mix, w.scale, initial_state=state, inplace=True)  # fmt: skip
        else:
            lin, state = chunk_dsla(queries, features, values, gates, w.mix, w.scale, state, output_final_state=True)
        cache[0][slot] = state[0]
        if not W:
            return (lin[..., :D] / (lin[..., D:].float() + 1e-6).to(lin.dtype))[0]
        positions = torch.arange(context - W, context + T, device=q.device).clamp(min=0)  # 0: the null entries
        cos, sin = (t.to(q.dtype) for t in rope_tables(positions[None], self.inv_freq))
        o = window_attention(q, *pending, cos, sin, lin, self.linear_log_scale)
        for page, kept in zip(cache[1:], next_window):
            page[slot] = kept[0]
        return o[0].to(q.dtype)


@eager_break_during_capture
def dsla_attention(
    hidden_states: torch.Tensor, output: torch.Tensor, positions: torch.Tensor, layer_name: str
) -> None:  # the op's schema is read from these annotations
    get_forward_context().no_compile_layers[layer_name].run(hidden_states, output, positions)


def dsla_attention_fake(hidden_states, output, positions, layer_name) -> None:
    return None


direct_register_custom_op(
    op_name="dsla_attention", op_func=dsla_attention, mutates_args=["output"], fake_impl=dsla_attention_fake
)


def decoder_layer(*, vllm_config: VllmConfig, prefix: str, dsla: frozenset[int]) -> LlamaDecoderLayer:
    kind = DSLAStateAttention if extract_layer_index(prefix) in dsla else LlamaAttention
    return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, attn_layer_type=kind)


class DSLAForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """A DSLA checkpoint (`DSLALlamaForCausalLM`) on vLLM, at the layout of :func:`dsla_layers`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.dsla_layers = dsla_layers(config)
        check_servable(config)
        layer = partial(decoder_layer, dsla=frozenset(self.dsla_layers))
        self.model = LlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), layer_type=layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))  # fmt: skip
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return (torch.float32,) * len(state_shapes(vllm_config.model_config.hf_config))

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return state_shapes(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return (get_temporal_copy_spec,) * 4

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's weights: a DSLA layer's `linear_attn.*` go to its state layer (which vLLM hosts under
        `self_attn`), those of layers served as softmax are left out."""
        dsla = {f"model.layers.{i}." for i in self.dsla_layers}

        def renamed():
            for name, tensor in weights:
                if ".linear_attn." in name:
                    if name[: name.index(".linear_attn.") + 1] not in dsla:
                        continue
                    name = name.replace(".linear_attn.", ".self_attn.")
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(renamed())
        for i in self.dsla_layers:
            self.model.layers[i].self_attn.merge_after_loading()
        return loaded
