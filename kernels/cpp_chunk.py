"""The fused C++ chunk kernel for CPU inference: ``cpp_chunk.cpp``, built on first use and called through ctypes.

The library (this kernel and the decoding step of ``cpp_decode.cpp``) is compiled once per machine and instruction
set with the system C++ compiler (``$CXX`` or ``g++``), ``-O3``, the ``-march`` of ``$DSLA_HF_CPU_ISA`` (default
``native``, tuned generically on AVX2-only CPUs: :func:`compile_flags`) and OpenMP, into ``$DSLA_HF_CACHE``
(default ``~/.cache/dsla_hf``) under a name that hashes the sources, the flags, the compiler and the CPU; later
processes load it in milliseconds. It needs no Python or PyTorch headers. Where no compiler is found or the build
fails, :func:`library` returns ``None`` (with one warning) and ``chunk_dsla`` uses the PyTorch path. The call
releases the GIL.

Forward only: training keeps the PyTorch path's autograd.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .dispatch import cpu_isa, cpu_name, cpuinfo
from .features import HedgehogFeatures, feature_tensor
from .gates import LinearGates
from .inputs import BLOCK_TOKENS, INFERENCE_CHUNK, DSLAInputs

# One library of the CPU kernels: the chunked prefill, the softmax window and the fused decoding step.
HERE = Path(__file__).parent
SOURCES = (HERE / "cpp_chunk.cpp", HERE / "cpp_decode.cpp", HERE / "cpp_window.cpp")
HEADERS = (HERE / "cpu_gemm.h",)
# Compiled with -ffast-math (vectorised expf from glibc's libmvec) but linked without it: a fast-math link adds
# crtfastmath.o (GCC < 13), whose constructor would flush denormals to zero for the whole process on load.
COMPILE = ("-O3", "-ffast-math", "-fopenmp", "-std=c++17", "-fPIC", "-c")
# DSLA_HF_CPU_ISA selects the instruction set: "native" (this CPU's), "avx2" (x86-64-v3, which runs on every
# AVX-512 CPU too: an AVX2-only machine's code measured here) or "avx512" (x86-64-v4).
ISA_FLAGS = {"native": "-march=native", "avx2": "-march=x86-64-v3", "avx512": "-march=x86-64-v4"}
# GCC's tuning for AVX2-only AMD cores (znver1, znver2) vectorises the plain loops (features, exponentials, RoPE) with
# 128-bit vectors and libmvec's SSE functions; generic tuning keeps 256 bits. On a Zen 1 EPYC the fused decoding call
# took 129-134 us against 148-153 us with -march=native alone (interleaved, one thread); prefill was unchanged.
AVX2_NATIVE_TUNE = "-mtune=generic"
LINK = ("-shared", "-fopenmp")
FLT_MAX = 3.4028234663852886e38  # the kernel's "no clamp": a finite bound, as -ffast-math assumes no infinities


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    return f"{cpu_name()}\n{cpuinfo().get('flags', '')}"


def _cache_dir() -> Path:
    return Path(os.environ.get("DSLA_HF_CACHE", Path.home() / ".cache" / "dsla_hf")) / "kernels"


def isa() -> str:
    """The instruction set the kernel is built for: ``$DSLA_HF_CPU_ISA`` (default ``native``)."""
    name = os.environ.get("DSLA_HF_CPU_ISA", "native").lower()
    if name not in ISA_FLAGS:
        raise ValueError(f"DSLA_HF_CPU_ISA={name!r}: choose one of {sorted(ISA_FLAGS)}")
    if name == "avx512" and cpu_isa() != "avx512" or name == "avx2" and cpu_isa() == "other":
        raise ValueError(f"DSLA_HF_CPU_ISA={name!r}: this CPU lacks that instruction set (it has {cpu_isa()})")
    return name


def vector_isa() -> str:
    """The kernel's code path in use: "avx512" (16-float vectors, 8 x 2 blocks), "avx2" (8-float, 4 x 2), or
    "generic" (8-float vectors, on CPUs with neither)."""
    name = isa()
    if name == "native":
        return {"avx512": "avx512", "avx2": "avx2"}.get(cpu_isa(), "generic")
    return name


def library() -> ctypes.CDLL | None:
    """The compiled kernel for :func:`isa`, building it if needed; ``None`` where it cannot be built here."""
    return build(isa())


def compile_flags(name: str) -> tuple[str, ...]:
    """The compiler's flags for instruction set ``name`` on this CPU."""
    tune = (AVX2_NATIVE_TUNE,) if name == "native" and cpu_isa() == "avx2" else ()
    return (*COMPILE, ISA_FLAGS[name], *tune)


@functools.cache
def build(name: str) -> ctypes.CDLL | None:
    """The kernel compiled for instruction set ``name`` (a key of :data:`ISA_FLAGS`), built once per machine."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or not all(source.is_file() for source in (*SOURCES, *HEADERS)):
        return None
    flags = compile_flags(name)
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        texts = [source.read_text() for source in (*SOURCES, *HEADERS)]
        key = hashlib.sha256("\n".join([*texts, *flags, *LINK, version, _cpu_signature()]).encode())
        target = _cache_dir() / f"cpp_chunk-{name}-{key.hexdigest()[:16]}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then move into place
                objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
                built = Path(tmp) / target.name
                commands = [[*flags, str(source), "-o", obj] for source, obj in zip(SOURCES, objects)]
                for cmd in [*commands, [*LINK, *objects, "-o", str(built)]]:
                    subprocess.run([compiler, *cmd], capture_output=True, text=True, check=True)
                os.replace(built, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"dsla_hf: the C++ CPU kernel could not be built, using the PyTorch path: {detail[-2000:]}",
                      stacklevel=2)  # fmt: skip
        return None
    lib.dsla_chunk_forward.restype = ctypes.c_int
    lib.dsla_decode_step.restype = None
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.dsla_decode_step.argtypes = [p, p, n, p, n, p, n, p, p, i, i, p, p, p, p, p, i]
    lib.dsla_window_attention.restype = None
    lib.dsla_window_attention.argtypes = [p, p, p, p, p, p, p, n, p, p, n, n, p, p, p, p, p, i, i, i, i, i, i, i]
    return lib


def available() -> bool:
    return library() is not None


def loaded() -> ctypes.CDLL:
    """The library, or a clear error where it cannot be had (for a backend forced to ``"cpp"``)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU kernel is not available on this machine (no compiler, or its build failed)")
    return lib


def _ptr(x: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if x is None else x.data_ptr())


def strides3(x: torch.Tensor | None) -> ctypes.Array:
    """The strides of the first three dimensions, as the kernels take them (zeros for an absent tensor)."""
    return (ctypes.c_long * 3)(*(x.stride()[:3] if x is not None else (0, 0, 0)))


def fp32_operand(x: torch.Tensor) -> torch.Tensor:
    """fp32 on the CPU with a unit stride in its last dimension; other strides are passed through."""
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def _linear_gates(gates: LinearGates, B: int, T: int, HK: int, K: int):
    """The kernel's operands for gates computed from their inputs (shapes checked by the entry point): x
    [B, T, HK, D] (stride 0 over heads for a shared input), W^T [HK, D, SKz] and biases [HK, SKz] in the padded
    columns s * Kp + f, the mask, tau, clamp."""
    S, _, _, D = gates.weight.shape
    x = fp32_operand(gates.x)
    if not gates.per_head:
        x = x[:, :, None].expand(B, T, HK, D)
    Kp = -(-K // 8) * 8
    SKz = -(-S * Kp // 16) * 16
    gw = torch.zeros(HK, D, SKz)
    gc = torch.zeros(HK, SKz)
    for s in range(S):
        gw[:, :, s * Kp : s * Kp + K] = gates.weight[s].float().transpose(1, 2)
        gc[:, s * Kp : s * Kp + K] = gates.bias[s].float()
    mask = None if gates.mask is None else gates.mask.float().contiguous()
    return x, gw, gc, mask, gates.tau, gates.clamp


def _feature_maps(q, k):
    """fp32 maps of queries and keys given as HedgehogFeatures, and the keys' mask: (q_map, k_map, mask), or None
    where they are not both given so (or their width is not a whole number of 16-float vectors, or they are not
    maps of inputs of one width)."""
    if not (isinstance(q, HedgehogFeatures) and isinstance(k, HedgehogFeatures)):
        return None
    if q.weight.shape[-1] % 16 or k.x.shape[-1] != q.x.shape[-1] or q.mask is not None:
        return None
    mask = None if k.mask is None else k.mask.float().contiguous()
    return q.weight.float().contiguous(), k.weight.float().contiguous(), mask


def ones_column(v: torch.Tensor) -> bool:
    """Whether the values' last column is all ones (the sum normaliser's), which the kernel then sums apart: 64
    value columns pad its products to 64, 65 to 80. The sums are the same whatever the values, so the column is
    found rather than declared."""
    return v.shape[-1] > 1 and bool((v[..., -1] == 1).all())


@torch.no_grad()
def chunk_dsla_cpp(
    x: DSLAInputs, chunk_size: int = INFERENCE_CHUNK, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_dsla`` (inference) by the fused C++ kernel, on checked inputs whose features and gates may still be
    given by their inputs. An fp32 ``out`` with a unit stride over values is written directly (its rows may overlay
    q's)."""
    lib = loaded()
    if any(t.device.type != "cpu" for t in x.tensors()):
        raise ValueError("the C++ kernel takes CPU tensors; use backend='triton' or 'torch' for other devices")
    B, T, H, HK, G, K, V, S, N = x.B, x.T, x.H, x.HK, x.G, x.K, x.V, x.S, x.N
    q, k = x.q, x.k
    maps = _feature_maps(q, k)
    if maps is None:  # features given (or maps the kernel does not take: computed here)
        q, k = feature_tensor(q), feature_tensor(k)
    dtype = q.dtype if maps is None else q.x.dtype
    if x.cu_seqlens is None:
        seq_b, seq_t0, seq_len = torch.arange(B), torch.zeros(B, dtype=torch.long), torch.full((B,), T)
    else:
        bounds = x.cu_seqlens.to("cpu", torch.long)
        seq_len = bounds[1:] - bounds[:-1]
        seq_b, seq_t0 = torch.zeros_like(seq_len), bounds[:-1].clone()
    if isinstance(x.g, LinearGates):
        gates = _linear_gates(x.g, B, T, HK, K)
        g1 = g2 = None
    else:
        gates = None
        g1 = fp32_operand(x.g[:, :, 0])
        g2 = g1 if S == 1 else fp32_operand(x.g[:, :, 1])
    w = (x.mix.reshape(HK, G, S) * x.scale).contiguous()  # the scale folded into the mixing weights
    q, k = (fp32_operand(q), fp32_operand(k)) if maps is None else (fp32_operand(q.x), fp32_operand(k.x))
    ones = ones_column(x.v)
    v = fp32_operand(x.v[..., : V - ones])
    q_map, k_map, feature_mask = maps or (None, None, None)
    gx, gw, gc, mask, tau, clamp = gates or (None, None, None, None, 1.0, None)
    strides = mask if mask is not None else feature_mask  # both [B, T] contiguous: one set of strides
    h0 = None if x.initial_state is None else x.initial_state.float().contiguous()
    direct = out is not None and out.dtype == torch.float32 and out.stride(-1) == 1
    if direct:
        o = out
        if x.cu_seqlens is not None:  # tokens outside every sequence are zeros, as in the other backends
            o[:, : int(bounds[0])].zero_()
            o[:, int(bounds[-1]) :].zero_()
    else:
        o = torch.empty(B, T, H, V) if x.cu_seqlens is None else torch.zeros(B, T, H, V)  # packing may leave a tail
    final = torch.empty(N, S, HK, K, V)
    status = lib.dsla_chunk_forward(
        _ptr(q), strides3(q), _ptr(k), strides3(k), _ptr(v), strides3(v), _ptr(g1), strides3(g1), _ptr(g2),
        strides3(g2), _ptr(gx), strides3(gx), 0 if gx is None else gx.shape[-1], _ptr(gw), _ptr(gc),
        ctypes.c_float(1.0 / tau), ctypes.c_float(-FLT_MAX if clamp is None else clamp), _ptr(mask),
        ctypes.c_long(0 if strides is None else T), ctypes.c_long(0 if strides is None else 1),
        _ptr(w), S, HK, G, K, V - ones, N, _ptr(seq_b.contiguous()), _ptr(seq_t0.contiguous()),
        _ptr(seq_len.contiguous()), _ptr(h0), _ptr(final), _ptr(o), strides3(o), chunk_size,
        max(1, BLOCK_TOKENS // chunk_size), torch.get_num_threads(), _ptr(q_map), _ptr(k_map), _ptr(feature_mask),
        0 if maps is None else q.shape[-1], 0 if maps is None else q_map.shape[-1], int(ones),
    )  # fmt: skip
    if status:
        raise MemoryError("the C++ CPU kernel could not allocate its workspace")
    final = final if x.output_final_state else None
    if out is not None:
        return (out if direct else out.copy_(o)), final
    return o.to(dtype), final
