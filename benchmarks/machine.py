"""Where a benchmark ran, and on which code paths: every result file of this folder records :func:`machine`.

``--isa avx2`` (see :func:`use_isa`) runs a benchmark on the AVX2 code of every library on an AVX-512 CPU: our C++
kernels built for x86-64-v3, PyTorch's own kernels (``ATEN_CPU_CAPABILITY``), MKL's and oneDNN's. That is the code
an AVX2-only CPU (an AMD EPYC of the Zen 2/3 generations, say) runs, on this CPU's caches and memory: it measures
the instruction set, not the other machine.
"""

from __future__ import annotations

import os
import platform
import sys

AVX2_ENV = {
    "DSLA_HF_CPU_ISA": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
KNOBS = (*AVX2_ENV, "DSLA_HF_CPP_KERNEL", "DSLA_HF_ONEDNN_LINEAR", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE")


def add_isa_argument(parser) -> None:
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="code paths: this CPU's own, or AVX2's (every library) on an AVX-512 CPU")  # fmt: skip


def use_isa(isa: str) -> None:
    """Re-run this process with the AVX2 code paths selected (they must be chosen before torch is imported)."""
    if isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})


def suffix(isa: str) -> str:
    """Result file names: ``kernels.json`` for the native run, ``kernels_avx2.json`` for the AVX2 one."""
    return "" if isa == "native" else f"_{isa}"


def machine(threads: int, device=None) -> dict:
    """CPU model, its widest vector ISA, the code paths in use (ours, PyTorch's), threads and versions; the GPU and
    its software when `device` is a CUDA device."""
    import torch
    import transformers

    from dsla_hf.kernels import cpp_chunk, projection_libraries
    from dsla_hf.kernels.dispatch import cpp_available, cpu_isa, cpu_name

    cpp = cpp_available()
    return {
        "cpu": cpu_name(),
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "threads": threads,
        "dsla_kernel_isa": cpp_chunk.vector_isa() if cpp else None,
        "default_cpu_backend": "cpp" if cpp else "torch",
        "cpu_projections": projection_libraries(),  # the libraries of `dsla_hf.kernels.linear`
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "env": {k: os.environ[k] for k in KNOBS if k in os.environ},
        "load_average": os.getloadavg(),
    } | (gpu(device) if device is not None and torch.device(device).type == "cuda" else {})


def gpu(device) -> dict:
    """The GPU, its CUDA and Triton versions, and which kernels the DSLA layers run there."""
    import torch

    from dsla_hf.kernels.dispatch import backend_summary

    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "dsla_backend": backend_summary(device),
    }


def describe(meta: dict) -> str:
    """One line for a Markdown result file."""
    if meta.get("gpu"):
        return (
            f"{meta['gpu']} ({meta['device']}), CUDA {meta['cuda']}, Triton {meta['triton']}; DSLA layers run "
            f"{meta['dsla_backend']}; torch {meta['torch']}, transformers {meta['transformers']}"
        )
    kernel = f"C++ kernels on the {meta['dsla_kernel_isa']} path" if meta["dsla_kernel_isa"] else "PyTorch path"
    projections = meta.get("cpu_projections", "mkl").replace("onednn", "oneDNN").replace("mkl", "MKL")
    projections = projections.replace("wide outputs", "wide outputs (the LM head)")
    return (
        f"{meta['cpu']} ({meta['cpu_isa']}), {meta['threads']} threads; {kernel}, projections by {projections}, "
        f"PyTorch on its {meta['torch_cpu_capability']} kernels; torch {meta['torch']}, "
        f"transformers {meta['transformers']}"
    )
