"""`dsla serve`."""

from ..serving.server import add_arguments, run  # noqa: F401  (moving here)
