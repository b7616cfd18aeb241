"""`dsla push`."""

from ..hub import add_arguments, run  # noqa: F401  (moving here)
