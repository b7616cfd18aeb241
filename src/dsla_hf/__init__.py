"""dsla-hf: dual-state linear attention (DSLA) and DSLA-Serve for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.dsla.cache_dsla import CacheCheckpoint, DSLACache, DSLACacheLayer
from .models.dsla.configuration_dsla import DSLAConfig
from .models.dsla.convert import convert_llama_to_dsla, dsla_config_from_llama
from .models.dsla.modeling_dsla import DSLALlamaForCausalLM, DSLALlamaModel
from .teacher import load_teacher

AutoConfig.register(DSLAConfig.model_type, DSLAConfig, exist_ok=True)
AutoModel.register(DSLAConfig, DSLALlamaModel, exist_ok=True)
AutoModelForCausalLM.register(DSLAConfig, DSLALlamaForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "DSLACache",
    "CacheCheckpoint",
    "DSLACacheLayer",
    "DSLAConfig",
    "DSLALlamaForCausalLM",
    "DSLALlamaModel",
    "convert_llama_to_dsla",
    "dsla_config_from_llama",
    "load_teacher",
]
