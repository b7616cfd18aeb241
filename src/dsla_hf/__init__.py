"""dsla-hf: dual-state linear attention (DSLA) and DSLA-Serve for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_dsla import DSLACache, DSLACacheLayer
from .configuration_dsla import DSLAConfig
from .convert import convert_llama_to_dsla, dsla_config_from_llama
from .modeling_dsla import DSLALlamaForCausalLM, DSLALlamaModel
from .teacher import load_teacher

AutoConfig.register(DSLAConfig.model_type, DSLAConfig, exist_ok=True)
AutoModel.register(DSLAConfig, DSLALlamaModel, exist_ok=True)
AutoModelForCausalLM.register(DSLAConfig, DSLALlamaForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "DSLACache",
    "DSLACacheLayer",
    "DSLAConfig",
    "DSLALlamaForCausalLM",
    "DSLALlamaModel",
    "convert_llama_to_dsla",
    "dsla_config_from_llama",
    "load_teacher",
]
