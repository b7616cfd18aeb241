"""Configuration of a Llama whose attention layers are each softmax attention or DSLA (dual-state linear attention)."""

from __future__ import annotations

import math

from transformers import LlamaConfig

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
LAYER_KINDS = (FULL_ATTENTION, LINEAR_ATTENTION)

FEATURE_MAPS = ("identity", "elu", "hedgehog")
NORMALIZERS = ("none", "sum", "rms")
GATE_SOURCES = ("key", "hidden")
GATE_INITS = ("half_life", "identity_random")
MIXINGS = ("layer", "head")

# The two presets of docs/design.md §1. Explicit `dsla_*` arguments override the preset's values.
PRESETS: dict[str, dict] = {
    # The reference formulation of the paper: raw q/k, no normaliser, gates from the hidden state (history gate's
    # weight the identity, recency gate's random), all heads (no GQA), own trained copies of q/k/v/o.
    "paper": dict(
        dsla_gqa=False,
        dsla_gate_source="hidden",
        dsla_gate_init="identity_random",
        dsla_feature_map="identity",
        dsla_normalizer="none",
        dsla_mixing="layer",
        dsla_lora_rank=0,
        dsla_train_projections=True,
        dsla_window=0,
    ),
    # GQA-aware and foldable: everything entering the states is a function of the teacher's (frozen) keys and values,
    # so a layer's states can be rebuilt exactly from its KV cache at run time.
    "default": dict(
        dsla_gqa=True,
        dsla_gate_source="key",
        dsla_gate_init="half_life",
        dsla_feature_map="hedgehog",
        dsla_normalizer="sum",
        dsla_mixing="head",
        dsla_lora_rank=8,
        dsla_train_projections=False,
        # A short exact softmax window beside the states (benchmarks/results/probe_defaults.md: layer-alone error
        # 0.13 with 64 tokens vs 0.41 without, at the same budget); the KV cache holds it, so the fold stays exact.
        dsla_window=64,
    ),
}


def ratio_to_layers(ratio: float, num_layers: int) -> int:
    """Layers converted at a conversion ratio: the floor of `ratio * num_layers` (a hair of slack, so 0.3 of 10 is 3).
    The one rounding every part of the project uses (the model, the serving policy, the chain, cards, evaluation)."""
    return math.floor(ratio * num_layers + 1e-6)


class DSLAConfig(LlamaConfig):
    r"""
    A [`LlamaConfig`] with DSLA layers.

    dsla_layers (`list[int]`): layers that own DSLA weights and so can run as DSLA.
    layer_types (`list[str]`): the current kind of every layer, `"full_attention"` or `"linear_attention"`; only
        layers in `dsla_layers` may be `"linear_attention"`.
    conversion_order (`list[int]`): the order in which layers are converted (sensitivity ranking). A ratio passed to
        `set_dsla_layers` converts a prefix of it. Defaults to `dsla_layers`.
    dsla_preset (`str`): `"default"` or `"paper"`; fills every `dsla_*` option not given explicitly.
    dsla_gate_tau (`float`): temperature of the gates, `log a = logsigmoid(W x + b) / tau`.
    dsla_gate_clamp (`float`, *optional*): lower bound of the per-token log gate.
    dsla_history_half_life / dsla_recency_half_life (`float`): initial half-lives (tokens) of the two states.
    dsla_feature_map (`str`): `"identity"`, `"elu"` (elu + 1) or `"hedgehog"` (softmax of a learned map, both signs).
    dsla_feature_dim (`int`, *optional*): width of the hedgehog map per sign (defaults to `head_dim`).
    dsla_normalizer (`str`): `"none"`, `"sum"` (divide by the mixed key sums) or `"rms"` (RMS norm of the output).
    dsla_mixing (`str`): mixing logits of the two states per `"layer"` or per `"head"`.
    dsla_lora_rank (`int`): rank of low-rank deltas on the query and output projections (0: none).
    dsla_train_projections (`bool`): DSLA layers own trainable copies of q/k/v/o (the paper) instead of borrowing
        the teacher's.
    dsla_num_states (`int`): 2 (history and recency), or 1 for a single-state GLA ablation.
    dsla_window (`int`): exact softmax attention over the last `dsla_window` tokens beside the states (LoLCATs-style;
        the states then hold the tokens before the window). 0 turns it off. Needs the sum normaliser.
    """

    model_type = "dsla_llama"

    layer_types: list[str] | None = None
    dsla_layers: list[int] | None = None
    conversion_order: list[int] | None = None
    dsla_preset: str = "default"
    dsla_num_states: int = 2
    dsla_gqa: bool | None = None
    dsla_gate_source: str | None = None
    dsla_gate_init: str | None = None
    dsla_gate_tau: float = 16.0
    dsla_gate_clamp: float | None = None
    dsla_history_half_life: float = 4096.0
    dsla_recency_half_life: float = 32.0
    dsla_feature_map: str | None = None
    dsla_feature_dim: int | None = None
    dsla_normalizer: str | None = None
    dsla_mixing: str | None = None
    dsla_lora_rank: int | None = None
    dsla_lora_alpha: float = 16.0
    dsla_train_projections: bool | None = None
    dsla_window: int | None = None

    def __post_init__(self, **kwargs):
        if self.dsla_preset not in PRESETS:
            raise ValueError(f"Unknown dsla_preset {self.dsla_preset!r}; choose one of {sorted(PRESETS)}")
        window_given = self.dsla_window is not None
        for key, value in PRESETS[self.dsla_preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not window_given and (self.dsla_normalizer != "sum" or self.dsla_gate_source != "key"):
            self.dsla_window = 0  # the preset's window only where the chosen options can host it
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        self.dsla_layers = sorted(self._check_indices(self.dsla_layers or [], "dsla_layers"))
        if self.layer_types is None:
            self.layer_types = [LINEAR_ATTENTION if i in self.dsla_layers else FULL_ATTENTION for i in range(n)]
        self.layer_types = list(self.layer_types)
        if self.conversion_order is None:
            self.conversion_order = list(self.dsla_layers)
        self.conversion_order = self._check_indices(self.conversion_order, "conversion_order")
        self._validate_dsla()

    def _check_indices(self, indices, name: str) -> list[int]:
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"{name} has layer indices {bad} outside [0, {self.num_hidden_layers - 1}]")
        if len(set(indices)) != len(indices):
            raise ValueError(f"{name} lists a layer more than once: {indices}")
        return indices

    def _validate_dsla(self) -> None:
        n = self.num_hidden_layers
        if len(self.layer_types) != n:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        unknown = sorted({t for t in self.layer_types if t not in LAYER_KINDS})
        if unknown:
            raise ValueError(f"Unknown layer kinds {unknown}; each layer is one of {LAYER_KINDS}")
        no_weights = [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION and i not in self.dsla_layers]
        if no_weights:
            raise ValueError(f"Layers {no_weights} are set to {LINEAR_ATTENTION!r} but have no DSLA weights")
        stray = [i for i in self.conversion_order if i not in self.dsla_layers]
        if stray:
            raise ValueError(f"conversion_order lists layers {stray} that have no DSLA weights")
        for name, allowed in (
            ("dsla_feature_map", FEATURE_MAPS),
            ("dsla_normalizer", NORMALIZERS),
            ("dsla_gate_source", GATE_SOURCES),
            ("dsla_gate_init", GATE_INITS),
            ("dsla_mixing", MIXINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.dsla_num_states not in (1, 2):
            raise ValueError(f"dsla_num_states must be 1 or 2, got {self.dsla_num_states}")
        if self.dsla_normalizer == "sum" and self.dsla_feature_map == "identity":
            raise ValueError("dsla_normalizer='sum' needs a positive feature map ('elu' or 'hedgehog')")
        if self.dsla_gate_tau <= 0:
            raise ValueError(f"dsla_gate_tau must be positive, got {self.dsla_gate_tau}")
        if self.dsla_gate_clamp is not None and self.dsla_gate_clamp >= 0:
            raise ValueError("dsla_gate_clamp is a lower bound on a log gate and must be negative")
        if self.dsla_window < 0:
            raise ValueError(f"dsla_window must be >= 0, got {self.dsla_window}")
        if self.dsla_window and (self.dsla_normalizer != "sum" or self.dsla_gate_source != "key"):
            raise ValueError("dsla_window needs dsla_normalizer='sum' and dsla_gate_source='key'")
        if self.dsla_lora_rank < 0:
            raise ValueError(f"dsla_lora_rank must be >= 0, got {self.dsla_lora_rank}")

    @property
    def foldable(self) -> bool:
        """Whether a layer's states can be rebuilt exactly from its KV cache (see docs/design.md §1)."""
        return self.dsla_gate_source == "key" and not self.dsla_train_projections

    @property
    def active_dsla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    def layers_for(self, layers: int | float | list[int] | tuple[int, ...] | None) -> list[int]:
        """Resolve a list of layer indices or a ratio (a prefix of `conversion_order`) to sorted layer indices."""
        if layers is None:
            return []
        if isinstance(layers, bool):
            raise TypeError("Pass a list of layer indices or a ratio in [0, 1], not a bool")
        if isinstance(layers, float):
            if not 0.0 <= layers <= 1.0:
                raise ValueError(f"A conversion ratio must be in [0, 1], got {layers}")
            count = ratio_to_layers(layers, self.num_hidden_layers)
            if count > len(self.conversion_order):
                raise ValueError(
                    f"Ratio {layers} needs {count} DSLA layers but only {len(self.conversion_order)} "
                    f"have DSLA weights (conversion_order={self.conversion_order})"
                )
            return sorted(self.conversion_order[:count])
        if isinstance(layers, int):
            raise TypeError(f"Pass a list of layer indices or a float ratio, not the int {layers}")
        indices = self._check_indices(layers, "layers")
        missing = [i for i in indices if i not in self.dsla_layers]
        if missing:
            raise ValueError(f"Layers {missing} have no DSLA weights (layers with weights: {self.dsla_layers})")
        return sorted(indices)


__all__ = ["DSLAConfig"]
