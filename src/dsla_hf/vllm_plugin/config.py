"""vLLM's per-architecture config hook for DSLA checkpoints: what the engine must be told before it builds."""

from __future__ import annotations

import logging

from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = logging.getLogger(__name__)


class DSLAModelConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        """Prefix caching is refused (turned off, with a warning): a DSLA layer's page holds one request's state at
        its latest token, not at block boundaries. Each request's state page then spans its whole length."""
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            logger.warning(
                "DSLA checkpoints: prefix caching is not supported by the vLLM plugin's DSLA layers; it is turned "
                "off (pass --no-enable-prefix-caching to silence this). `dsla serve` has run-time switching instead."
            )
            cache_config.enable_prefix_caching = False
        cache_config.mamba_cache_mode = "none"
        if cache_config.mamba_block_size is None:
            cache_config.mamba_block_size = vllm_config.model_config.max_model_len
