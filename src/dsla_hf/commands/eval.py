"""`dsla eval`."""

from ..evaluation.suite import add_arguments, run  # noqa: F401  (moving here)
