"""Imports whose public location depends on the transformers version.

transformers >= 5.17 is supported. Up to at least 5.17, ``transformers.AutoImageProcessor`` is a
placeholder that raises "requires the Torchvision library" when torchvision is not installed (it
is not in our core install); the class itself, which falls back to the PIL image processors,
is importable from its module in every 5.x release.
"""

from transformers.models.auto.image_processing_auto import AutoImageProcessor

__all__ = ["AutoImageProcessor"]
