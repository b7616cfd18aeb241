"""Where a command runs and in which dtype: the `--device` / `--dtype` options shared by `dsla serve`, `dsla eval`,
`dsla demo` and the benchmarks, checked once with errors that say what to pass instead."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; otherwise any name torch knows (`cpu`,
    `cuda`, `cuda:1`), checked to exist here."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a CUDA device that supports it, float32 elsewhere (the CPU kernels are fp32); otherwise
    one of :data:`DTYPES`. DSLA states stay fp32 whatever the dtype."""
    if name in (None, "", "auto"):
        cuda = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device, so that wall clocks measure it (nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> dict:
    """Where timings on `device` come from, for result files: the CPU (model, widest vector ISA), torch's threads,
    the kernels DSLA layers run and the projections' library there (or the GPU), and the versions."""
    import transformers

    from .kernels import backend_summary, projection_libraries
    from .kernels.dispatch import cpu_isa, cpu_name

    where = {"cpu": cpu_name(), "cpu_isa": cpu_isa()}
    where["threads"] = torch.get_num_threads()
    where["dsla_kernels"] = backend_summary(device)
    if device.type == "cuda":
        where["gpu"] = torch.cuda.get_device_name(device)
    else:
        where["cpu_projections"] = projection_libraries()
    return {**where, "torch": torch.__version__, "transformers": transformers.__version__}


def add_device_arguments(parser: argparse.ArgumentParser, dtype_default: str | None = "auto") -> None:
    """`--device`, and `--dtype` unless `dtype_default` is None (commands that train keep fp32 weights)."""
    parser.add_argument(
        "--device", default="auto", type=_device_option, help="auto (CUDA when there is one), cpu, cuda or cuda:N"
    )
    if dtype_default is not None:
        parser.add_argument(
            "--dtype",
            default=dtype_default,
            choices=["auto", *DTYPES],
            help="weights' dtype (auto: bfloat16 on CUDA, float32 on CPU); DSLA states stay float32",
        )


def _device_option(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as error:  # argparse then prints the message and the usage, not a traceback
        raise argparse.ArgumentTypeError(str(error)) from None


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The parsed `--device` and `--dtype` (float32 where the command has no `--dtype`)."""
    device = resolve_device(args.device)
    return device, resolve_dtype(getattr(args, "dtype", "float32"), device)


__all__ = [
    "DTYPES",
    "add_device_arguments",
    "describe",
    "device_and_dtype",
    "resolve_device",
    "resolve_dtype",
    "synchronize",
]
