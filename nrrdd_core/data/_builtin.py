"""Imports every built-in dataset module so that each registers itself (a missing module is an
error, not a dataset silently left out)."""

from . import shapes, npz, torchvision_sets, imagefolder, stream  # noqa: F401, I001 - registration order
