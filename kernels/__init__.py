"""DSLA kernels behind one API, in the style of flash-linear-attention's ``ops/gla``.

- ``chunk_dsla``: prefill and training (chunked, both states in one pass).
- ``fused_recurrent_dsla``: decoding, one or a few tokens per step.
- ``fold_kv``: rebuild the states of a layer from cached keys and values.
- ``naive_dsla``: the fp32 token-by-token reference.
- ``fused_decode_dsla``: one decoding step of a default-preset layer (features, gates, states, window), fused.
- ``window_attention``: the softmax window beside the states, sharing their normaliser; ``advance_window``: which
  pending tokens enter the states and which stay in the window.
- ``LinearGates``, ``HedgehogFeatures``: gates, and query and key features, given by their inputs and weights in
  place of tensors (the C++ kernel computes them chunk by chunk; the other backends materialise them).
- ``linear`` (``Linear``, ``use_fast_linears``): dense projections, by oneDNN on CPUs where MKL would run
  narrower code than the CPU has (AVX-512 CPUs not made by Intel).
- ``scratch``: reusable CPU tensors for intermediates that die within a call (a long prompt's, above the mmap
  threshold, would be fresh pages every time).

Each entry point checks its inputs once (:func:`.inputs.check_inputs`: shapes, grouped heads, one gate tensor
``g`` [B, T, S, HK, K] for S = 1 or 2 states, the mixing weights as fp32 [H, S], the default scale, packing),
picks a backend with :func:`.dispatch.resolve_backend` ("torch", "triton", "cpp" or "naive") and calls it from
the registry :data:`.dispatch.REGISTRY`, which imports the Triton and C++ kernels only when they run. Shapes and
the recurrence: :mod:`.inputs`; each entry point's arguments: its docstring.
"""


def _installed_kernels():
    """The spec of an installed top-level ``kernels`` package, looked up on sys.path without this repository."""
    import importlib.machinery
    import os
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    return importlib.machinery.PathFinder.find_spec("kernels", path)


# Imported as top-level ``kernels``, this folder is shadowing Hugging Face's package of that name (the repository root
# is on sys.path: ``python -m``/``-c`` or pytest from a clone), which transformers imports where it is installed: the
# name goes to the installed package. Where there is none, transformers finds no version here and leaves it alone.
if __name__ == "kernels" and (_spec := _installed_kernels()) is not None:
    import importlib.util
    import sys

    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds once this body ends
    _spec.loader.exec_module(_module)
else:
    from .chunk import chunk_dsla
    from .decode import DecodeWeights, decode_backend, fused_decode_dsla, naive_decode_dsla
    from .dense import Linear, linear, onednn_preferred, projection_libraries, use_fast_linears
    from .dispatch import backend_summary
    from .features import HedgehogFeatures, feature_tensor, hedgehog
    from .fold import fold_kv
    from .fused_recurrent import fused_recurrent_dsla
    from .gates import LinearGates
    from .inputs import RECURRENT_MAX_TOKENS
    from .naive import naive_dsla
    from .window import advance_window, window_attention
    from .workspace import scratch

    __all__ = [
        "RECURRENT_MAX_TOKENS",
        "DecodeWeights",
        "HedgehogFeatures",
        "Linear",
        "LinearGates",
        "advance_window",
        "backend_summary",
        "chunk_dsla",
        "decode_backend",
        "feature_tensor",
        "fold_kv",
        "fused_decode_dsla",
        "fused_recurrent_dsla",
        "hedgehog",
        "linear",
        "naive_decode_dsla",
        "naive_dsla",
        "onednn_preferred",
        "projection_libraries",
        "scratch",
        "use_fast_linears",
        "window_attention",
    ]
