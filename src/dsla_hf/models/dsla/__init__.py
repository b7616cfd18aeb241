"""DSLA-Llama, laid out as a Transformers model: its config, its modeling file (layers, model, causal LM), its
hybrid cache, the conversion of a Llama and the remote code every saved folder carries."""

from .cache_dsla import CacheCheckpoint, DSLACache, DSLACacheLayer
from .configuration_dsla import FULL_ATTENTION, LINEAR_ATTENTION, DSLAConfig, ratio_to_layers
from .convert import convert_llama_to_dsla, dsla_config_from_llama
from .modeling_dsla import DSLALlamaForCausalLM, DSLALlamaModel, DSLAPreTrainedModel

__all__ = [
    "FULL_ATTENTION",
    "LINEAR_ATTENTION",
    "DSLACache",
    "CacheCheckpoint",
    "DSLACacheLayer",
    "DSLAConfig",
    "DSLALlamaForCausalLM",
    "DSLALlamaModel",
    "DSLAPreTrainedModel",
    "convert_llama_to_dsla",
    "dsla_config_from_llama",
    "ratio_to_layers",
]
