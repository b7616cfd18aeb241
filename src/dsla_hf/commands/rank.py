"""`dsla rank`."""

from ..ranking import add_arguments, run  # noqa: F401  (moving here)
