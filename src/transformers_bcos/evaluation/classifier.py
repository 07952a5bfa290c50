"""A common view of B-cos and standard transformers image classifiers for the evaluation code.

Every metric in this package feeds RGB pixels in [0, 1] (N, 3, H, W). A B-cos model takes them as
they are; a standard model expects its image processor's mean/std normalisation, which
`PixelClassifier` applies inside the forward pass, so that post-hoc attributions are taken with
respect to the same [0, 1] pixels as B-cos explanations and both are scored by the same code.
"""

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from transformers import AutoModelForImageClassification

from .._compat import AutoImageProcessor
from ..configuration_bcos import FIXED_SIZE_MODEL_TYPES
from ..modeling_bcos import BcosPreTrainedModel

CONFIDENCE_CRITERIA = ("sigmoid", "softmax")


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _normalization(image_processor) -> tuple:
    """(mean, std) that ``image_processor`` applies to [0, 1] pixels, or (None, None)."""
    if image_processor is None:
        return None, None
    settings = image_processor if isinstance(image_processor, dict) else image_processor.to_dict()
    if not settings.get("do_normalize", False):
        return None, None
    return settings["image_mean"], settings["image_std"]


class PixelClassifier(nn.Module):
    """An image classifier that takes RGB pixels in [0, 1], with what the metrics need to know.

    Args:
        model: a `BcosForImageClassification` or a standard transformers image classifier.
        image_mean, image_std: the normalisation a standard model was trained with (its image
            processor's); applied inside `forward`. None for B-cos models and unnormalised models.
        confidence: how class scores become probabilities when selecting confident images:
            ``"sigmoid"`` (B-cos models, trained with binary cross-entropy), ``"softmax"``
            (standard models), or a callable ``logits -> probabilities``. None picks by the model:
            sigmoid when its config says ``problem_type="multi_label_classification"``.
    """

    def __init__(
        self,
        model: nn.Module,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        confidence: Union[None, str, Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        super().__init__()
        if (image_mean is None) != (image_std is None):
            raise ValueError("Pass both image_mean and image_std, or neither.")
        self.model = model
        self.is_bcos = isinstance(model, BcosPreTrainedModel)
        if self.is_bcos and image_mean is not None:
            raise ValueError("B-cos models take unnormalised pixels in [0, 1]: do not pass image_mean/image_std.")
        if image_mean is not None:
            self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        else:
            self.image_mean = self.image_std = None
        if confidence is None:
            multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
            confidence = "sigmoid" if multi_label else "softmax"
        if isinstance(confidence, str) and confidence not in CONFIDENCE_CRITERIA:
            raise ValueError(f"confidence must be one of {CONFIDENCE_CRITERIA} or a callable, got {confidence!r}.")
        self.confidence_criterion = confidence

    @classmethod
    def wrap(cls, model, image_processor=None, confidence=None) -> "PixelClassifier":
        """``model`` as a PixelClassifier; a standard model needs the ``image_processor`` it was trained with."""
        if isinstance(model, PixelClassifier):
            return model
        mean, std = _normalization(image_processor)
        return cls(model, mean, std, confidence)

    @classmethod
    def from_pretrained(cls, path, confidence=None, **kwargs) -> "PixelClassifier":
        """Load a saved classifier (B-cos or standard) and, for a standard one, its image processor."""
        model = AutoModelForImageClassification.from_pretrained(path, **kwargs).eval()
        processor = None
        if not isinstance(model, BcosPreTrainedModel):
            processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        return cls.wrap(model, processor, confidence)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):
        return self.model.config

    @property
    def fixed_input_size(self) -> Optional[tuple]:
        """(H, W) the model requires (ViT-family position embeddings), or None for any size."""
        if self.is_bcos:
            return self.config.image_size
        if self.config.model_type in FIXED_SIZE_MODEL_TYPES:
            return _pair(self.config.image_size)
        return None

    @property
    def patch_size(self) -> Optional[tuple]:
        """The patch size of a ViT-family model (to lay its tokens out on the image), else None."""
        config = self.config.backbone_config if self.is_bcos else self.config
        if config.model_type not in FIXED_SIZE_MODEL_TYPES:
            return None
        return _pair(config.patch_size)

    def prepare(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Move [0, 1] pixels to the model's device and dtype (normalisation happens in forward)."""
        return pixel_values.to(device=self.device, dtype=self.dtype)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """Logits (and hidden states) for RGB pixels in [0, 1]."""
        inputs = pixel_values
        if self.image_mean is not None:
            inputs = (pixel_values - self.image_mean.to(pixel_values.dtype)) / self.image_std.to(pixel_values.dtype)
        return self.model(pixel_values=inputs, output_hidden_states=output_hidden_states)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities under this classifier's confidence criterion."""
        if self.confidence_criterion == "sigmoid":
            return torch.sigmoid(logits)
        if self.confidence_criterion == "softmax":
            return torch.softmax(logits, dim=-1)
        return self.confidence_criterion(logits)
