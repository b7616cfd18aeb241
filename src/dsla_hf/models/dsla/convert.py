"""Turn a `LlamaForCausalLM` into a `DSLALlamaForCausalLM` that shares the teacher's weights."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .configuration_dsla import DSLAConfig
from .modeling_dsla import DSLALlamaForCausalLM


def dsla_config_from_llama(
    config: LlamaConfig,
    layers: list[int] | str | None = None,
    conversion_order: list[int] | None = None,
    **dsla_kwargs,
) -> DSLAConfig:
    """A `DSLAConfig` with the teacher's architecture; `layers` ("all" or indices) own DSLA weights."""
    if isinstance(config, DSLAConfig):
        raise TypeError("This config is already a DSLAConfig")
    if config.model_type != "llama":
        raise TypeError(f"Only Llama-architecture teachers can be converted, got model_type={config.model_type!r}")
    n = config.num_hidden_layers
    if layers is None or (isinstance(layers, str) and layers == "all"):
        layers = list(range(n))
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'all' or a list of layer indices, got {layers!r}")
    layers = list(layers)
    base = config.to_dict()
    for key in (
        "model_type",
        "architectures",
        "transformers_version",
        "auto_map",
        "quantization_config",
        "layer_types",
    ):
        base.pop(key, None)
    order = list(conversion_order) if conversion_order is not None else layers
    return DSLAConfig(
        **base, dsla_layers=layers, conversion_order=order, architectures=["DSLALlamaForCausalLM"], **dsla_kwargs
    )


def convert_llama_to_dsla(
    model: LlamaForCausalLM,
    layers: list[int] | str | None = None,
    conversion_order: list[int] | None = None,
    active: list[int] | float | None = None,
    **dsla_kwargs,
) -> DSLALlamaForCausalLM:
    """Convert a Llama into a DSLA-Llama in which `layers` (default: all) own DSLA weights.

    The teacher's tensors are reused, not copied: the returned model shares them (freeze them, or clone the
    teacher first, before training them). New DSLA parameters are initialised as docs/design.md §1 says; with the paper
    preset, converted layers get their own copies of q/k/v/o, initialised from the teacher's.

    Args:
        layers: layers that get DSLA weights, "all" or a list of indices.
        conversion_order: the order in which layers are converted (defaults to `layers`).
        active: the layers that run as DSLA right away (indices or a ratio); defaults to all of `layers`.
        dsla_kwargs: `dsla_preset` and any `dsla_*` option of `DSLAConfig`.
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"convert_llama_to_dsla expects a LlamaForCausalLM, got {type(model).__name__}")
    config = dsla_config_from_llama(model.config, layers, conversion_order, **dsla_kwargs)
    config._attn_implementation = model.config._attn_implementation
    param = next(model.parameters())
    with torch.device("meta"):
        student = DSLALlamaForCausalLM(config)
    teacher_state = model.state_dict()
    missing, unexpected = student.load_state_dict(teacher_state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"Teacher weights with no place in the DSLA model: {unexpected[:5]}")
    # Materialise and initialise the new DSLA parameters (everything the teacher did not provide).
    new_names = set(missing)
    for name, tensor in list(student.named_parameters()) + list(student.named_buffers()):
        if name in new_names or tensor.is_meta:
            _replace_tensor(student, name, torch.empty(tensor.shape, dtype=param.dtype, device=param.device))
    student.tie_weights()
    for module in student.modules():
        if isinstance(module, LlamaRotaryEmbedding):  # the model's and each DSLA layer's: inv_freq was on meta
            module.__init__(config)
            module.to(param.device)
    for layer in student.model.layers:
        if layer.linear_attn is not None:
            layer.linear_attn.reset_dsla_parameters()
            if config.dsla_train_projections:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.linear_attn, proj).load_state_dict(getattr(layer.self_attn, proj).state_dict())
    student.set_dsla_layers(active if active is not None else config.dsla_layers)
    student.train(model.training)
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = model.generation_config
    return student


def _replace_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    if isinstance(getattr(module, leaf), torch.nn.Parameter):
        setattr(module, leaf, torch.nn.Parameter(value, requires_grad=getattr(module, leaf).requires_grad))
    else:
        setattr(module, leaf, value)  # a registered buffer: replaced in place, its persistence kept
