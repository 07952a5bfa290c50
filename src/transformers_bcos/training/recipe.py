"""The B-cos training recipe: documented defaults per model family, optimizer and schedule.

Defaults (``recipe_defaults``), with their sources:

* B-cosified CNNs (ResNet, ConvNeXt, ...), ImageNet scale: AdamW, lr 1e-4, weight decay 0, cosine
  schedule without warm-up, AGC 0.01 -- the B-cosification paper's fine-tuning recipe (reference
  §3). BatchNorm statistics are re-estimated on 1,000 training images before the first step
  (§7: this alone lifts a converted MNIST CNN from chance to 67%).
* B-cosified ViTs, ImageNet scale: lr 1e-3 with linear warm-up (5% of the steps), cosine decay,
  AGC 0.01 (§3).
* Every architecture takes the CNN or the ViT recipe by kind (`recipe_family`): transformers (ViT,
  DeiT, DINOv2, Swin, BEiT, SigLIP, ...) the ViTs', the others the CNNs'. So do B-cosified plain
  PyTorch, torchvision and timm models: those with attention (timm's ViTs) the ViTs', the others
  the CNNs'.
* B-cos networks from scratch: lr 1e-3, cosine, warm-up 5 of 90 epochs (5.5% of the steps) for
  CNNs and ~10k of ~450k steps (2.2%) for ViTs, AGC 0.01 (§2).
* B-cos CLIP image towers, distilled from the original tower (`CLIP_DISTILLATION_RECIPE`):
  Adam(W) lr 1e-4, weight decay 0, cosine schedule (reference §3, CLIP); no AGC (the reference
  names none for CLIP).
* The embedded MNIST data set (small data, a few epochs): lr 1e-3 for B-cosified models.
  Measured (§7): lr 1e-3 passed the source's 97.2% after 1.25 epochs and ended at 97.5-97.8%,
  lr 1e-4 ended at 95.9% after 3 epochs -- short runs need the larger step.

Every value can be overridden on the command line; the chosen values go into the model card.
"""

import math
from dataclasses import asdict, dataclass

import torch
from transformers import get_scheduler

from ..configuration_bcos import PLAIN_MODULE_FAMILY
from ..rules import InlineAttention

# The kinds of model with a recipe of their own: convolutional networks and transformers.
FAMILIES = ("cnn", "vit")


@dataclass(frozen=True)
class Recipe:
    """Hyperparameter defaults for one kind of run."""

    learning_rate: float
    weight_decay: float
    lr_scheduler_type: str
    warmup_fraction: float
    agc_clip_factor: float
    bn_reestimation_images: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)

    def warmup_steps(self, total_steps: int) -> int:
        return int(math.ceil(self.warmup_fraction * total_steps))


_BCOSIFY_CNN = Recipe(1e-4, 0.0, "cosine", 0.0, 0.01, 1000, "B-cosification fine-tuning recipe for CNNs (reference §3)")
_BCOSIFY_VIT = Recipe(1e-3, 0.0, "cosine", 0.05, 0.01, 0, "B-cosification fine-tuning recipe for ViTs (reference §3)")
_SCRATCH_CNN = Recipe(1e-3, 0.0, "cosine", 5 / 90, 0.01, 0, "B-cos v2 from-scratch recipe for CNNs (reference §2)")
_SCRATCH_VIT = Recipe(1e-3, 0.0, "cosine", 10_000 / 450_000, 0.01, 0, "B-cos v2 from-scratch recipe for ViTs (reference §2)")
_BCOSIFY_SMALL_DATA_CNN = Recipe(
    1e-3, 0.0, "cosine", 0.0, 0.01, 1000, "B-cosification on the embedded MNIST, lr calibrated in reference §7"
)
_BCOSIFY_SMALL_DATA_VIT = Recipe(
    1e-3, 0.0, "cosine", 0.05, 0.01, 0, "B-cosification on the embedded MNIST (ViT recipe of reference §3)"
)

CLIP_DISTILLATION_RECIPE = Recipe(
    1e-4, 0.0, "cosine", 0.0, 0.0, 0, "B-cos CLIP distillation recipe (reference §3, CLIP)"
)


def recipe_family(config, model=None) -> str:
    """The family whose recipe a B-cos classifier of ``config`` (a `BcosConfig`) trains with: "vit"
    for a transformer (its config, or a sub-config such as SigLIP's vision config, has attention
    heads) and "cnn" for any other.

    A model converted from a plain PyTorch module (a torchvision or timm model) has no config that
    describes its layers, so its kind is read from the B-cos ``model`` itself: "vit" when it holds
    attention (timm's attention modules, made B-cos by the rules), else "cnn".
    """
    if config.backbone_family == PLAIN_MODULE_FAMILY:
        if model is None:
            raise ValueError("A B-cos model converted from a plain PyTorch module: pass the model, whose modules tell its recipe.")
        return "vit" if any(isinstance(module, InlineAttention) for module in model.modules()) else "cnn"
    backbone = config.backbone_config
    configs = [backbone] + [getattr(backbone, key, None) for key in getattr(backbone, "sub_configs", {})]
    heads = [getattr(c, name, None) for c in configs if c is not None for name in ("num_attention_heads", "num_heads")]
    return "vit" if any(heads) else "cnn"


def recipe_defaults(family: str, from_scratch: bool = False, small_data: bool = False) -> Recipe:
    """The documented defaults for a ``family`` ("cnn", "vit") model
    (`recipe_family` of its config).

    ``small_data`` selects the values calibrated on the embedded MNIST (a few epochs on 4,000
    images) instead of the ImageNet-scale recipe. BatchNorm re-estimation applies to B-cosified
    models with batch norms (ResNets); it is 0 (off) elsewhere.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; known: {', '.join(FAMILIES)}.")
    cnn = family == "cnn"
    if from_scratch:
        return _SCRATCH_CNN if cnn else _SCRATCH_VIT
    if small_data:
        return _BCOSIFY_SMALL_DATA_CNN if cnn else _BCOSIFY_SMALL_DATA_VIT
    return _BCOSIFY_CNN if cnn else _BCOSIFY_VIT


def create_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 1-D tensors (norm gains, tokens) get no weight decay."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)


def create_scheduler(optimizer, lr_scheduler_type: str, num_warmup_steps: int, num_training_steps: int, num_processes: int = 1):
    """A transformers scheduler (cosine, linear, constant_with_warmup, ...) for ``num_training_steps`` updates.

    An Accelerate-prepared scheduler steps once per process per update, so the step counts are
    multiplied by ``num_processes`` (as in transformers' no_trainer examples).
    """
    return get_scheduler(
        lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps * num_processes,
        num_training_steps=num_training_steps * num_processes,
    )
