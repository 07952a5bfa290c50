"""Imports whose public location depends on the transformers version or on torchvision.

transformers >= 5.17 is supported. Up to at least 5.17, ``transformers.AutoImageProcessor`` is a
placeholder that raises "requires the Torchvision library" when torchvision is not installed (it
is not in our core install); the class itself, which falls back to the PIL image processors,
is importable from its module in every 5.x release.

``transformers.ViTImageProcessor`` is the torchvision-backed processor since 5.17; without
torchvision, transformers substitutes ``ViTImageProcessorPil`` and logs a warning on every run
("requires torchvision ... Install torchvision"). We take the PIL class directly then: same
processing, no warning, and a saved config that loads with or without torchvision.
"""

from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.utils import is_torchvision_available

if is_torchvision_available():
    from transformers import ViTImageProcessor
else:
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as ViTImageProcessor

__all__ = ["AutoImageProcessor", "ViTImageProcessor"]
