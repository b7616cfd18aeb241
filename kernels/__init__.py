"""DSLA kernels behind one API, in the style of flash-linear-attention's ``ops/gla``.

- ``chunk_dsla``: prefill and training (chunked, both states in one pass).
- ``fused_recurrent_dsla``: decoding, one or a few tokens per step.
- ``fold_kv``: rebuild the states of a layer from cached keys and values.
- ``naive_dsla``: the fp32 token-by-token reference.
- ``LinearGates``: gates given by their inputs and weights, in place of gate tensors (computed in the C++ kernel).

Shapes and semantics are documented in :mod:`dsla_hf.kernels.naive`.
"""

from .chunk import chunk_dsla
from .fold import fold_kv
from .fused_recurrent import fused_recurrent_dsla
from .gates import LinearGates
from .naive import naive_dsla

__all__ = ["LinearGates", "chunk_dsla", "fold_kv", "fused_recurrent_dsla", "naive_dsla"]
