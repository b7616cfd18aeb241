"""`dsla demo`."""

from ..demo import add_arguments, run  # noqa: F401  (moving here)
