"""DSLA checkpoints on vLLM: an out-of-tree model plugin (entry point group ``vllm.general_plugins``).

With dsla-hf installed beside vLLM, ``vllm serve <dsla checkpoint>`` and ``vllm.LLM(<dsla checkpoint>)`` run the
checkpoint's static layout: softmax layers through vLLM's attention and paged KV cache, DSLA layers as vLLM state
layers (one fixed-size page per request: both states, the normaliser column and the softmax window) on the DSLA
kernels. The layout is the checkpoint's ``layer_types``, or a ratio given at start: ``--hf-overrides
'{"dsla_ratio": 0.5}'`` converts the first half of its ``conversion_order``. vLLM cannot change a layer's kind while
it runs: run-time switching stays with ``dsla serve``.

This module is imported by every vLLM process at start, so it imports vLLM lazily: ``register`` is all it does.
"""

from __future__ import annotations

ARCHITECTURE = "DSLALlamaForCausalLM"


def register() -> None:
    """Register the DSLA config with Transformers' Auto classes and the model with vLLM's registry (lazily)."""
    from vllm import ModelRegistry

    import dsla_hf  # noqa: F401  (registers DSLAConfig with AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "dsla_hf.vllm_plugin.model:DSLAForCausalLM")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import DSLAModelConfig

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, DSLAModelConfig)
