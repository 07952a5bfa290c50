"""transformers-bcos: inherently interpretable B-cos models for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForZeroShotImageClassification
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_bcos import BcosConfig
from .configuration_bcos_clip import BcosCLIPConfig
from .conversion import bcosify_pretrained
from .conversion.clip import bcosify_clip
from .explanation import BcosExplanationOutput, Unit, explanation_mode
from .modeling_bcos import BcosForImageClassification, BcosPreTrainedModel
from .modeling_bcos_clip import BcosCLIPExplanationOutput, BcosCLIPModel, BcosCLIPZeroShotOutput
from .pipeline_bcos import IMAGE_EXPLANATION_TASK, ImageExplanationPipeline

__version__ = "0.1.0"

# With the package installed, the Auto classes know B-cos models without remote code.
AutoConfig.register(BcosConfig.model_type, BcosConfig, exist_ok=True)
AutoModel.register(BcosConfig, BcosForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(BcosConfig, BcosForImageClassification, exist_ok=True)
AutoConfig.register(BcosCLIPConfig.model_type, BcosCLIPConfig, exist_ok=True)
AutoModel.register(BcosCLIPConfig, BcosCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(BcosCLIPConfig, BcosCLIPModel, exist_ok=True)
# pipeline("image-explanation", model=<a B-cos model object>, image_processor=...) with the package
# installed; saved folders name the pipeline in config.custom_pipelines (remote code) instead.
PIPELINE_REGISTRY.register_pipeline(
    IMAGE_EXPLANATION_TASK, pipeline_class=ImageExplanationPipeline, pt_model=AutoModelForImageClassification, type="image"
)

__all__ = [
    "BcosCLIPConfig",
    "BcosCLIPExplanationOutput",
    "BcosCLIPModel",
    "BcosCLIPZeroShotOutput",
    "BcosConfig",
    "BcosExplanationOutput",
    "BcosForImageClassification",
    "BcosPreTrainedModel",
    "ImageExplanationPipeline",
    "Unit",
    "bcosify_clip",
    "bcosify_pretrained",
    "explanation_mode",
]
