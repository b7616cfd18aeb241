"""Loading a model by the name a command line gives: `smollm2` (the embedded teacher, offline), a DSLA checkpoint
or a Llama (a folder, a chain's output folder, or a hub id), in a dtype and on a device. One loader for every
command: `dsla serve`, `dsla eval`, `dsla rank`, `dsla distill` and the benchmarks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEACHER_SPECS = (None, "", "smollm2")


def resolve_model_path(spec: str) -> str:
    """A chain output folder (`<dir>/checkpoint/config.json`) resolves to its checkpoint."""
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoint" / "config.json").is_file():
        return str(path / "checkpoint")
    return spec


def load_pretrained(
    spec: str | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tokenizer: str | None = None,
):
    """`(model, tokenizer, name)` as saved: the teacher (a Llama) for `smollm2`, else what `spec` holds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in TEACHER_SPECS:
        from .teacher import TEACHER_NAME, load_teacher

        model, tok = load_teacher(dtype=dtype)
        return model.to(device).eval(), tok, TEACHER_NAME
    path = resolve_model_path(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
    except (OSError, ValueError) as err:
        raise ValueError(f"No tokenizer in {path} ({err}); pass --tokenizer") from None
    return model, tok, str(spec)


def as_dsla(model):
    """A DSLA model with DSLA weights in every layer it can convert: a DSLA model as it is, a Llama converted in
    every layer (untrained DSLA weights), none of them active."""
    from .models.dsla.convert import convert_llama_to_dsla
    from .models.dsla.modeling_dsla import DSLAPreTrainedModel

    if isinstance(model, DSLAPreTrainedModel):
        return model
    if model.config.model_type != "llama":
        raise ValueError(f"A {model.config.model_type!r} model: DSLA converts Llama models (or loads DSLA ones)")
    return convert_llama_to_dsla(model, layers="all", active=[]).eval()


def load_dsla(
    spec: str | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tokenizer: str | None = None,
):
    """`(model, tokenizer, name)`: `spec` loaded by :func:`load_pretrained`, then :func:`as_dsla`; a Llama is
    converted with untrained DSLA weights (said once in the log)."""
    model, tok, name = load_pretrained(spec, dtype, device, tokenizer)
    if model.config.model_type == "llama" and spec not in TEACHER_SPECS:
        logger.info("Converting the Llama at %s to DSLA in every layer (untrained DSLA weights)", spec)
    return as_dsla(model), tok, name


def trained_layers(spec: str) -> int | None:
    """How many chain stages trained the checkpoint at `spec` (its `chain.json`), or None when it has none."""
    if spec in TEACHER_SPECS:
        return None
    chain_file = Path(resolve_model_path(spec)) / "chain.json"
    if not chain_file.is_file():
        return None
    return len(json.loads(chain_file.read_text()).get("stages", []))


def load_student(model_name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(student with every layer owning DSLA weights, tokenizer) from 'smollm2', a folder or a hub id: a Llama is
    converted (none active, every weight frozen), a DSLA checkpoint returned as saved."""
    teacher, tokenizer, _ = load_pretrained(model_name, dtype, device)
    student = as_dsla(teacher)
    if student is not teacher:
        student.requires_grad_(False)
    return student, tokenizer


__all__ = ["as_dsla", "load_dsla", "load_pretrained", "load_student", "resolve_model_path", "trained_layers"]
