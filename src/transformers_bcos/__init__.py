"""transformers-bcos: inherently interpretable B-cos models for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_bcos import BcosConfig
from .conversion import bcosify_pretrained
from .explanation import BcosExplanationOutput, explanation_mode
from .modeling_bcos import BcosForImageClassification, BcosPreTrainedModel

__version__ = "0.1.0"

# With the package installed, the Auto classes know B-cos models without remote code.
AutoConfig.register(BcosConfig.model_type, BcosConfig, exist_ok=True)
AutoModel.register(BcosConfig, BcosForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(BcosConfig, BcosForImageClassification, exist_ok=True)

__all__ = [
    "BcosConfig",
    "BcosExplanationOutput",
    "BcosForImageClassification",
    "BcosPreTrainedModel",
    "bcosify_pretrained",
    "explanation_mode",
]
