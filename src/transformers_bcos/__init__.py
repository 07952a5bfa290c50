"""transformers-bcos: inherently interpretable B-cos models for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForZeroShotImageClassification

from .configuration_bcos import BcosConfig
from .configuration_bcos_clip import BcosCLIPConfig
from .conversion import bcosify_pretrained
from .conversion.clip import bcosify_clip
from .explanation import BcosExplanationOutput, explanation_mode
from .modeling_bcos import BcosForImageClassification, BcosPreTrainedModel
from .modeling_bcos_clip import BcosCLIPExplanationOutput, BcosCLIPModel, BcosCLIPZeroShotOutput

__version__ = "0.1.0"

# With the package installed, the Auto classes know B-cos models without remote code.
AutoConfig.register(BcosConfig.model_type, BcosConfig, exist_ok=True)
AutoModel.register(BcosConfig, BcosForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(BcosConfig, BcosForImageClassification, exist_ok=True)
AutoConfig.register(BcosCLIPConfig.model_type, BcosCLIPConfig, exist_ok=True)
AutoModel.register(BcosCLIPConfig, BcosCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(BcosCLIPConfig, BcosCLIPModel, exist_ok=True)

__all__ = [
    "BcosCLIPConfig",
    "BcosCLIPExplanationOutput",
    "BcosCLIPModel",
    "BcosCLIPZeroShotOutput",
    "BcosConfig",
    "BcosExplanationOutput",
    "BcosForImageClassification",
    "BcosPreTrainedModel",
    "bcosify_clip",
    "bcosify_pretrained",
    "explanation_mode",
]
