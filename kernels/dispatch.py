"""Which backend runs a kernel call, and the registry of backends: Triton on CUDA tensors; on CPUs the fused C++
kernels for inference (where they build) and the PyTorch path otherwise.

This module is part of the flat, self-contained kernel code that saved models carry as remote code: it imports
nothing from ``dsla_hf`` at module level. The Triton kernels are imported lazily by relative import, so they ship
with remote code and run from a saved folder on CUDA wherever Triton is installed. The C++ kernels (their sources
are not Python files a folder can carry) are reached by absolute import and stay with the installed package.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
from collections.abc import Callable
from types import ModuleType

import torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    try:
        importlib.import_module(".triton_chunk", __package__)  # the installed package's, or a saved folder's
    except Exception:  # a folder saved without the Triton kernels, or a Triton this code does not run on
        return False
    return True


def cpp_available() -> bool:
    """Whether chunk_dsla's inference uses the fused C++ CPU kernel by default.

    ``DSLA_HF_CPP_KERNEL=0`` turns it off and ``=1`` on; unset, the rule is: on x86-64 CPUs with AVX2 and FMA (where
    the kernel was measured faster than the PyTorch path at every length and batch, both on AVX2-only and on AVX-512
    code), off elsewhere. It must also be part of the installed package (not of remote code) and build here."""
    choice = os.environ.get("DSLA_HF_CPP_KERNEL")
    if choice == "0" or (choice is None and not cpu_has_avx2()):
        return False
    try:
        return package_module("cpp_chunk").available()
    except ImportError:
        return False


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first CPU's fields in ``/proc/cpuinfo`` ("model name", "flags", ...); empty where it cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first CPU's block
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers: a VM often shows a bare "AMD EPYC", which names
    Zen 1 (family 23) and Zen 5 (family 26) alike."""
    info = cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where they cannot be read). Cached: the backend choice asks on every decoding
    step of every layer, and splitting the flags line costs ~10 us."""
    return frozenset(cpuinfo().get("flags", "").split())


def cpu_has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def cpu_isa() -> str:
    """The widest x86 vector instruction set of this CPU the kernels have a path for: "avx512", "avx2" or "other"."""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if cpu_has_avx2() else "other"


def package_module(name: str) -> ModuleType:
    """``dsla_hf.kernels.<name>`` (the C++ kernels), imported by name: a static import statement would make
    Transformers' remote-code import check demand ``dsla_hf`` from every Hub repository that carries these kernels."""
    return importlib.import_module(f"dsla_hf.kernels.{name}")


# The registry: (operation, backend) -> a function that imports the implementation and returns it, at the call (so
# that a patched module attribute is the one called). The PyTorch paths are looked up beside this module (by name:
# they import it); the Triton ones by relative import statements, because remote code ships the modules such lines
# name and Triton is needed only where they run; the C++ ones through package_module.
#
# What each operation's implementations take: "chunk" (x: DSLAInputs, chunk_size), plus out for "cpp", which alone
# reads features and gates given by their inputs; "recurrent" (x, inplace); "fold" (x, chunk_size); "decode" and
# "window" the arguments of fused_decode_dsla and window_attention.


def _here(module: str, name: str) -> Callable[[], Callable]:
    return lambda: getattr(importlib.import_module(f".{module}", __package__), name)


def _cpp(module: str, name: str) -> Callable[[], Callable]:
    return lambda: getattr(package_module(module), name)


def _triton_chunk() -> Callable:
    from .triton_chunk import chunk_dsla_triton

    return chunk_dsla_triton


def _triton_fold() -> Callable:
    from .triton_chunk import fold_kv_triton

    return fold_kv_triton


def _triton_recurrent() -> Callable:
    from .triton_recurrent import fused_recurrent_dsla_triton

    return fused_recurrent_dsla_triton


def _triton_decode() -> Callable:
    from .triton_decode import triton_decode_dsla

    return triton_decode_dsla


REGISTRY: dict[tuple[str, str], Callable[[], Callable]] = {
    ("chunk", "torch"): _here("chunk", "chunk_dsla_torch"),
    ("chunk", "triton"): _triton_chunk,
    ("chunk", "cpp"): _cpp("cpp_chunk", "chunk_dsla_cpp"),
    ("chunk", "naive"): _here("naive", "naive_forward"),
    ("recurrent", "torch"): _here("fused_recurrent", "fused_recurrent_dsla_torch"),
    ("recurrent", "triton"): _triton_recurrent,
    ("recurrent", "naive"): _here("fused_recurrent", "fused_recurrent_naive"),
    ("fold", "torch"): _here("chunk", "chunk_states_torch"),
    ("fold", "triton"): _triton_fold,
    ("fold", "naive"): _here("fold", "fold_kv_naive"),
    ("decode", "triton"): _triton_decode,
    ("decode", "cpp"): _cpp("cpp_decode", "cpp_decode_dsla"),
    ("decode", "naive"): _here("decode", "naive_decode_dsla"),
    ("window", "torch"): _here("window", "window_attention_torch"),
    ("window", "cpp"): _cpp("cpp_window", "window_attention_cpp"),
}


# operation -> its backends, once: resolve_backend runs on every decoding step of every layer
CHOICES: dict[str, list[str]] = {}
for _operation, _backend in sorted(REGISTRY):
    CHOICES.setdefault(_operation, []).append(_backend)


def implementation(operation: str, backend: str) -> Callable:
    """The function that runs ``operation`` on ``backend`` (a pair :func:`resolve_backend` returned)."""
    return REGISTRY[operation, backend]()


def resolve_backend(
    operation: str, x: torch.Tensor | torch.device, backend: str | None = None, cpp: bool = False
) -> str:
    """``backend`` if given (checked against the registry); else, of the backends of ``operation``: ``"triton"``
    for CUDA tensors when Triton is importable, ``"cpp"`` for CPU tensors when the caller allows it (inference)
    and the kernels are available, else ``"torch"`` (``"naive"`` where the operation has no PyTorch path)."""
    choices = CHOICES[operation]
    if backend is not None:
        if backend not in choices:
            raise ValueError(f"unknown backend {backend!r} for {operation}; choose one of {choices}")
        return backend
    device = x if isinstance(x, torch.device) else x.device
    if device.type == "cuda" and "triton" in choices and triton_available():
        return "triton"
    if cpp and device.type == "cpu" and "cpp" in choices and cpp_available():
        return "cpp"
    return "torch" if "torch" in choices else "naive"


def backend_summary(device: torch.device) -> str:
    """In words, which kernels DSLA layers run on `device` by default, and why not a faster one."""
    if device.type == "cuda":
        if triton_available():
            return "the Triton kernels (CUDA)"
        return "the PyTorch path on CUDA: Triton is not importable here (pip install triton) and is much faster"
    if device.type != "cpu":
        return f"the PyTorch path ({device.type})"
    if cpp_available():
        return f"the C++ CPU kernels ({cpu_isa()})"
    if os.environ.get("DSLA_HF_CPP_KERNEL") == "0":
        why = "DSLA_HF_CPP_KERNEL=0"
    elif not cpu_has_avx2():
        why = "this CPU has no AVX2/FMA"
    elif not __package__.startswith("dsla_hf"):
        why = "the C++ kernels come with the dsla-hf package, not with remote code: pip install dsla-hf"
    else:
        why = "the C++ kernel does not build here"
    return f"the PyTorch path on CPU ({why})"


def fp32_compute(fn):
    """Run a PyTorch-path kernel with autocast off: it casts to fp32 itself and writes into fp32 buffers, and under
    autocast its matmuls would silently return bf16 (or fail against those buffers in the backward)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # the device of the first tensor argument, or of a DSLAInputs
        device = next((a.device.type for a in args if isinstance(getattr(a, "device", None), torch.device)), "cpu")
        if not torch.is_autocast_enabled(device):  # the common case, and the decode step's: no context to enter
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
