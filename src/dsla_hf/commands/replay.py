"""`dsla replay`."""

from ..serving.replay import add_arguments, run  # noqa: F401  (moving here)
