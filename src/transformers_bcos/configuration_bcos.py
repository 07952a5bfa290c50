"""Configuration of B-cos image classifiers.

This file travels with saved checkpoints (``trust_remote_code``): it imports torch,
transformers and the standard library only.
"""

import math

from transformers import AutoConfig, PretrainedConfig, ResNetConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

# Every image classifier of transformers is B-cosified by the module-type rules (`rules.py`) over
# its own modules and forward: the "rules" family.
RULES_FAMILY = "rules"
# transformers' ViT and DeiT take the one input size their position embeddings were learned for
# (unless asked to interpolate them); their B-cos models keep that size (`BcosConfig.image_size`).
FIXED_SIZE_MODEL_TYPES = ("vit", "deit")
# A plain PyTorch classifier (`PlainModuleConfig`), B-cosified by the same rules.
PLAIN_MODULE_FAMILY = "module"


# Libraries whose models a `PlainModuleConfig` can name, so that they are rebuilt from the config.
MODEL_LIBRARIES = ("timm", "torchvision")


class PlainModuleConfig(PretrainedConfig):
    r"""What a config can say about a plain PyTorch classifier (an ``nn.Module`` that is not a
    transformers model): its input, and the code that holds the architecture.

    Args:
        module_class (`str`): the qualified name of the module's class ("my_package.nets.Net"),
            for messages.
        num_channels (`int`, *optional*, defaults to 3): 1 (grey) or 3 (RGB) pixel channels.
        image_size (`int` or `(int, int)`, *optional*, defaults to 224): the input size the
            module takes.
        image_mean, image_std (`list[float]`, *optional*): the source's input normalisation, folded
            into the module that reads the pixels.
        library (`str`, *optional*): "timm" or "torchvision" when the module is a model of that
            library that ``architecture`` and ``architecture_kwargs`` rebuild
            (``timm.create_model(architecture, **architecture_kwargs)``,
            ``torchvision.models.get_model(architecture, **architecture_kwargs)``); otherwise the
            architecture is the class's code, which loading needs as an instance.
    """

    model_type = "bcos_plain_module"

    def __init__(
        self,
        module_class: str = "",
        num_channels: int = 3,
        image_size=224,
        image_mean=None,
        image_std=None,
        library=None,
        architecture: str = "",
        architecture_kwargs=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if library is not None and library not in MODEL_LIBRARIES:
            raise ValueError(f"library must be one of {', '.join(MODEL_LIBRARIES)} or None, got {library!r}.")
        self.module_class = module_class
        self.num_channels = num_channels
        self.image_size = image_size
        self.image_mean = image_mean
        self.image_std = image_std
        self.library = library
        self.architecture = architecture
        self.architecture_kwargs = dict(architecture_kwargs or {})


# Registered here, not only in the package: saved folders reload this config without it.
AutoConfig.register(PlainModuleConfig.model_type, PlainModuleConfig, exist_ok=True)


def backbone_family_of(model_type: str) -> str:
    """The B-cos backbone family of a transformers ``model_type``; a ValueError for a model type
    that has no image-classification model in transformers."""
    if model_type == PlainModuleConfig.model_type:
        return PLAIN_MODULE_FAMILY
    if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return RULES_FAMILY
    raise ValueError(
        f"Unsupported backbone {model_type!r}: B-cos models mirror a transformers image classifier "
        f"(a model type of AutoModelForImageClassification, such as vit, resnet, convnext, dinov2 or swin)."
    )


class BcosConfig(PretrainedConfig):
    r"""Configuration of a [`BcosForImageClassification`] model.

    The architecture is described by ``backbone_config``, the configuration of the standard
    transformers image classifier the B-cos network is (`ViTConfig`, `ResNetConfig`,
    `Dinov2Config`, ... : any model of `AutoModelForImageClassification`, B-cosified by the
    module-type rules over its own modules and forward), or a `PlainModuleConfig` for a plain
    PyTorch, torchvision or timm classifier; the B-cos options sit beside it. Labels
    (``id2label``) belong to this config, not to the backbone's.

    Args:
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            The mirrored architecture. Defaults to a ResNet-50 `ResNetConfig`.
        b (`float`, *optional*, defaults to 2.0):
            The B-cos exponent of every convolution and linear layer. 1 gives plain linear maps.
        use_bias (`bool`, *optional*, defaults to `False`):
            Keep the additive terms (biases, batch-norm centring). B-cos models have none; `True`
            with `b=1` reproduces the source model exactly.
        logit_bias (`float`, *optional*):
            A fixed constant added to every logit. Defaults to -log(C-1), so that
            sigmoid(logit_bias) = 1/C, which the B-cos binary cross-entropy loss expects.
        normalize_weights (`bool`, *optional*, defaults to `True`):
            Use unit-norm filters in the B-cos layers, as B-cos v2 does for models trained from
            scratch. `bcosify_pretrained` sets it to `False`: B-cosified models keep the raw
            pretrained filters (which only rescales each output channel).
        image_processor (`dict`, *optional*):
            The image processor saved with the model (a transformers image-processor dict that
            outputs pixels in [0, 1] without mean/std normalisation).
    """

    model_type = "bcos"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config=None,
        b: float = 2.0,
        use_bias: bool = False,
        logit_bias=None,
        normalize_weights: bool = True,
        image_processor=None,
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = ResNetConfig()
        elif isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        elif not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(f"backbone_config must be a PretrainedConfig or a dict, got {type(backbone_config).__name__}.")
        backbone_family_of(backbone_config.model_type)
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"The B-cos exponent b must be a finite number > 0, got {b!r}.")
        self.backbone_config = backbone_config
        self.b = float(b)
        self.use_bias = bool(use_bias)
        self.normalize_weights = bool(normalize_weights)
        self.image_processor = image_processor
        # B-cos models are trained with binary cross-entropy: their class scores are sigmoids.
        kwargs.setdefault("problem_type", "multi_label_classification")
        super().__init__(**kwargs)
        if logit_bias is None:
            logit_bias = -math.log(self.num_labels - 1) if self.num_labels > 1 else 0.0
        self.logit_bias = float(logit_bias)

    @property
    def backbone_family(self) -> str:
        """'rules' (a transformers architecture B-cosified by the module-type rules) or 'module'
        (a plain PyTorch classifier, B-cosified by the same rules)."""
        return backbone_family_of(self.backbone_config.model_type)

    @property
    def num_channels(self) -> int:
        """The pixel channels the model reads (before the encoding [x, 1 - x] doubles them)."""
        return getattr(self.backbone_config, "num_channels", 3)

    @property
    def image_size(self):
        """The fixed input size (height, width) of ViT and DeiT models, else None (any size)."""
        if self.backbone_config.model_type not in FIXED_SIZE_MODEL_TYPES:
            return None
        size = self.backbone_config.image_size
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)
