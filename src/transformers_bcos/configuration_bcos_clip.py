"""Configuration of B-cos CLIP models (a B-cos image tower beside CLIP's frozen text tower).

This file travels with saved checkpoints (``trust_remote_code``): it imports torch,
transformers and the standard library only.
"""

import math

from transformers import AutoConfig, CLIPConfig, PretrainedConfig

# transformers ``model_type`` of the dual encoders whose image tower can be B-cosified.
SUPPORTED_CLIP_TYPES = ("clip",)


class BcosCLIPConfig(PretrainedConfig):
    r"""Configuration of a [`BcosCLIPModel`].

    The architecture is described by ``clip_config``, the `CLIPConfig` of the source model: its
    ``vision_config`` is mirrored by the B-cos image tower, its ``text_config`` builds the
    unchanged (frozen) CLIP text tower, and ``projection_dim`` / ``logit_scale_init_value`` are
    CLIP's. The B-cos options apply to the image tower only.

    Args:
        clip_config (`CLIPConfig` or `dict`, *optional*):
            The source CLIP architecture. Defaults to `CLIPConfig()` (ViT-B/32).
        b (`float`, *optional*, defaults to 2.0):
            The B-cos exponent of every convolution and linear layer of the image tower.
        use_bias (`bool`, *optional*, defaults to `False`):
            Keep the image tower's biases. `True` with `b=1` reproduces the source image embeddings.
        normalize_weights (`bool`, *optional*, defaults to `False`):
            Use unit-norm filters in the B-cos layers. B-cosified models keep the raw pretrained ones.
        image_processor (`dict`, *optional*):
            The image processor saved with the model: the source's, without mean/std normalisation,
            so that it outputs pixels in [0, 1].
    """

    model_type = "bcos_clip"
    sub_configs = {"clip_config": AutoConfig}

    def __init__(
        self,
        clip_config=None,
        b: float = 2.0,
        use_bias: bool = False,
        normalize_weights: bool = False,
        image_processor=None,
        **kwargs,
    ):
        if clip_config is None:
            clip_config = CLIPConfig()
        elif isinstance(clip_config, dict):
            clip_config = AutoConfig.for_model(**clip_config)
        elif not isinstance(clip_config, PretrainedConfig):
            raise TypeError(f"clip_config must be a CLIPConfig or a dict, got {type(clip_config).__name__}.")
        if clip_config.model_type not in SUPPORTED_CLIP_TYPES:
            raise ValueError(
                f"clip_config must describe a CLIP model (model_type in {SUPPORTED_CLIP_TYPES}), "
                f"got model_type {clip_config.model_type!r}."
            )
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"The B-cos exponent b must be a finite number > 0, got {b!r}.")
        self.clip_config = clip_config
        self.b = float(b)
        self.use_bias = bool(use_bias)
        self.normalize_weights = bool(normalize_weights)
        self.image_processor = image_processor
        super().__init__(**kwargs)

    @property
    def vision_config(self):
        return self.clip_config.vision_config

    @property
    def text_config(self):
        return self.clip_config.text_config

    @property
    def projection_dim(self) -> int:
        return self.clip_config.projection_dim

    @property
    def image_size(self) -> tuple:
        """The fixed input size (height, width) of the image tower."""
        size = self.vision_config.image_size
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)
