"""`dsla distill`."""

from ..trainers.chain import add_arguments, run  # noqa: F401  (moving here)
