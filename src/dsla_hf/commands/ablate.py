"""`dsla ablate`."""

from ..evaluation.ablation import add_arguments, run  # noqa: F401  (moving here)
