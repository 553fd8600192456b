"""Imports every built-in method module so that each registers itself (a missing module is an
error, not a method silently left out)."""

from . import sre2l, rded, nrrdd, edf  # noqa: F401, I001 - registration order as before
