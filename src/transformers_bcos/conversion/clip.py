"""B-cosify a pretrained CLIP model, and distil its B-cos image tower on images alone.

`bcosify_clip` builds a `BcosCLIPModel`, whose image tower is CLIP's own B-cosified by the
module-type rules, as every image classifier is: the source's image-side tensors are installed
under their own keys (`copy_tensors_by_key`, the normalisation folded into the patch embedding);
the text tower, its projection and the logit scale are copied unchanged. The B-cos image tower
then learns to match the original one by distillation (`siglip_distillation_loss`): no captions
or labels are needed.
"""

import copy
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoTokenizer, CLIPModel, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .._compat import AutoImageProcessor
from ..configuration_bcos_clip import SUPPORTED_CLIP_TYPES, BcosCLIPConfig
from ..modeling_bcos_clip import BcosCLIPModel
from ..rules import find_pixel_reader
from . import _processor_settings, check_all_written, check_conversion_arguments, copy_tensors_by_key
from .exactness import nonlinear_modules, normalised, raise_if_inexact, relative_error

try:
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import no_init_weights

logger = logging.get_logger(__name__)


def _load_clip_source(src, image_processor, tokenizer, **kwargs):
    """(CLIPModel, image processor, tokenizer or None) for a folder, Hub id or CLIPModel."""
    if isinstance(src, PreTrainedModel):
        if not isinstance(src, CLIPModel):
            raise ValueError(
                f"bcosify_clip needs a CLIPModel, got {type(src).__name__} (model_type {src.config.model_type!r}). "
                "Image classifiers are converted by bcosify_pretrained."
            )
        model, location = src, getattr(src.config, "_name_or_path", "")
    elif isinstance(src, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(src, **kwargs)
        if config.model_type not in SUPPORTED_CLIP_TYPES:
            raise ValueError(
                f"{src} holds a {config.model_type!r} model; bcosify_clip needs a CLIP model (model_type 'clip')."
            )
        model, location = CLIPModel.from_pretrained(src, **kwargs), src
    else:
        raise TypeError(f"src must be a Hub id, a local folder or a CLIPModel, got {type(src).__name__}.")

    if image_processor is None and location:
        try:
            image_processor = AutoImageProcessor.from_pretrained(location, **kwargs)
        except (OSError, ValueError):
            image_processor = None
    if image_processor is None:
        raise ValueError(
            f"No image processor found for {location or type(src).__name__}: pass image_processor= (the processor the "
            "source CLIP was trained with), so that its normalisation can be folded into the patch embedding."
        )
    if tokenizer is None and location:
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        except (OSError, ValueError):
            tokenizer = None
    return model, image_processor, tokenizer


def _copy_same_class(source: nn.Module, target: nn.Module, written: set) -> None:
    """Copy every parameter and buffer between two modules of the same class and configuration."""
    if type(source) is not type(target):
        raise TypeError(f"Cannot copy a {type(source).__name__} into a {type(target).__name__}.")
    source_tensors = [*source.parameters(), *source.buffers()]
    target_tensors = [*target.parameters(), *target.buffers()]
    shapes = [tuple(t.shape) for t in source_tensors], [tuple(t.shape) for t in target_tensors]
    if shapes[0] != shapes[1]:
        raise ValueError(f"The {type(source).__name__} of the source and of the B-cos model differ in their tensors.")
    for s, d in zip(source_tensors, target_tensors):
        d.copy_(s)
        written.add(id(d))


def bcosify_clip(
    src: Union[str, os.PathLike, CLIPModel],
    b: float = 2.0,
    keep_bias: bool = False,
    *,
    image_processor=None,
    tokenizer=None,
    check: bool = True,
    **from_pretrained_kwargs,
) -> BcosCLIPModel:
    """B-cosify the image tower of a pretrained CLIP model; keep its text tower unchanged.

    Args:
        src: a Hub id, a local folder written by ``save_pretrained`` or a `CLIPModel`.
        b: the B-cos exponent of the image tower (2 for B-cos; 1 with ``keep_bias=True``
            reproduces the source's image embeddings).
        keep_bias: keep the image tower's biases (False for B-cos models).
        image_processor: the source's image processor (object or dict), if it cannot be loaded from
            ``src``. Its mean/std are folded into the patch embedding; the B-cos model's processor is
            the same without normalisation (pixels in [0, 1]).
        tokenizer: the source's tokenizer, if it cannot be loaded from ``src``. It is attached as
            ``model.tokenizer`` and saved by ``save_pretrained``.
        check: run `check_clip_exactness` before returning (one float64 pass on a random image and
            two random texts): an `ExactnessError` names the modules that break completeness (or,
            for b = 1 with biases, says that the image embeddings differ from the source's).
        from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``, ...).

    Returns:
        A `BcosCLIPModel` in the source's dtype, in eval mode, with a frozen text tower.
    """
    check_conversion_arguments(b, keep_bias)
    source, processor, tokenizer = _load_clip_source(src, image_processor, tokenizer, **from_pretrained_kwargs)
    if tokenizer is None:
        logger.warning("No tokenizer found for the source CLIP: pass tokenizer= to tokenise text with the model.")
    mean, std, processor_dict = _processor_settings(processor)

    config = BcosCLIPConfig(
        clip_config=copy.deepcopy(source.config), b=b, use_bias=keep_bias, image_processor=processor_dict
    )
    with no_init_weights():
        model = BcosCLIPModel(config)
    model.to(next(source.parameters()).dtype)

    # The image tower: every tensor under its own key, shapes checked before anything is written.
    source_tower = nn.ModuleDict({"vision_model": source.vision_model, "visual_projection": source.visual_projection})
    bcos_tower = nn.ModuleDict({"vision_model": model.vision_model, "visual_projection": model.visual_projection})
    reader = find_pixel_reader(bcos_tower, 2 * config.vision_config.num_channels, encoded=True)
    try:
        written = copy_tensors_by_key(source_tower, bcos_tower, reader, mean, std)
    except ValueError as error:
        raise ValueError(f"Cannot convert the image tower of this {type(source).__name__}: {error}") from error
    with torch.no_grad():
        # The text side: the same transformers classes, copied unchanged.
        _copy_same_class(source.text_model, model.text_model, written)
        _copy_same_class(source.text_projection, model.text_projection, written)
        model.logit_scale.copy_(source.logit_scale)
        written.add(id(model.logit_scale))
    check_all_written(model, written)
    model.eval()
    if check:
        check_clip_exactness(model, source if (b == 1 and keep_bias) else None, mean, std)
    model.tokenizer = tokenizer
    return model


def check_clip_exactness(model: BcosCLIPModel, source: Optional[CLIPModel] = None, mean=None, std=None) -> dict:
    """`check_exactness` for B-cos CLIP: in float64, on a random image and two random texts, the
    contributions to each cosine must sum to it (for a model without biases) and, with ``source``,
    the image embeddings must be the source's on the image normalised by mean/std. Raises an
    `ExactnessError`; returns the measured relative errors."""
    check_model = copy.deepcopy(model).double().eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, *model.config.image_size, dtype=torch.float64, generator=generator)
    errors = {}
    if not model.config.use_bias:
        input_ids = torch.randint(0, model.config.text_config.vocab_size, (2, 6), generator=generator)
        explanation = check_model.explain(x, input_ids=input_ids)
        sums = explanation.contributions.sum((-2, -1))
        scale = torch.maximum(explanation.explained_output.abs(), explanation.contributions.abs().sum((-2, -1)))
        errors["completeness"] = relative_error(sums, explanation.explained_output, scale)
    if source is not None:
        reference = copy.deepcopy(source).double().eval()
        with torch.no_grad():
            expected = reference.get_image_features(pixel_values=normalised(x, mean, std)).pooler_output
            got = check_model.get_image_features(pixel_values=x).pooler_output
        errors["equivalence"] = relative_error(got, expected, expected)
    raise_if_inexact(errors, lambda: nonlinear_modules(check_model, check_model.encode_inputs(x), check_model.get_image_features))
    return errors


# ----------------------------------------------------------------------------------------------
# Distillation on images alone
# ----------------------------------------------------------------------------------------------


def siglip_distillation_loss(
    student_embeds: torch.Tensor, teacher_embeds: torch.Tensor, scale: float = 10.0, bias: float = -10.0
) -> torch.Tensor:
    """SigLIP-style loss pulling each student embedding towards the teacher's of the same image.

    Both (N, D) embeddings are L2-normalised; logits = scale·(e_s @ e_tᵀ) + bias; the label is +1
    for the same image (the diagonal) and -1 for the others; loss = -mean log σ(label·logit).
    """
    if student_embeds.dim() != 2 or student_embeds.shape != teacher_embeds.shape:
        raise ValueError(
            "student and teacher embeddings must both have shape (N, D) for the same N images, got "
            f"{tuple(student_embeds.shape)} and {tuple(teacher_embeds.shape)}."
        )
    student = F.normalize(student_embeds.float(), dim=-1)
    teacher = F.normalize(teacher_embeds.float(), dim=-1)
    logits = scale * student @ teacher.t() + bias
    labels = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).mean()


class CLIPImageTeacher(nn.Module):
    """The original CLIP image tower as a frozen teacher: pixels in [0, 1] -> image embeddings.

    It applies the source's mean/std normalisation itself, so student and teacher see the same
    input tensors.
    """

    def __init__(self, clip: CLIPModel, image_mean, image_std):
        super().__init__()
        if not isinstance(clip, CLIPModel):
            raise ValueError(f"The teacher must be the source CLIPModel, got {type(clip).__name__}.")
        self.clip = clip.eval().requires_grad_(False)
        dtype = next(clip.parameters()).dtype
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=dtype).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=dtype).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        normalized = (pixel_values.to(self.image_mean.dtype) - self.image_mean) / self.image_std
        features = self.clip.get_image_features(pixel_values=normalized)
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
        return features.pooler_output if isinstance(features, ModelOutput) else features


class ImageTowerDistillation(nn.Module):
    """The student as a module whose forward is the distillation loss of a batch.

    This is what Accelerate prepares for training (DDP synchronises gradients through a
    module's forward); the frozen teacher stays outside it, so that checkpoints hold the student
    alone. ``student`` is the `BcosCLIPModel` to save at the end.
    """

    def __init__(self, student: BcosCLIPModel, scale: float = 10.0, bias: float = -10.0):
        super().__init__()
        self.student = student
        self.scale, self.bias = scale, bias

    def forward(self, pixel_values: torch.Tensor, teacher_embeds: torch.Tensor) -> torch.Tensor:
        student_embeds = self.student.get_image_features(pixel_values=pixel_values).pooler_output
        return siglip_distillation_loss(student_embeds, teacher_embeds, self.scale, self.bias)


def distillation_pair(src: Union[str, os.PathLike], b: float = 2.0, **from_pretrained_kwargs) -> tuple:
    """(B-cos student, frozen teacher) for distilling the CLIP at ``src`` (a Hub id or folder
    holding its image processor and tokenizer): the source is loaded once; the student gets its
    own copies of the weights, the teacher keeps the original image tower."""
    source, processor, tokenizer = _load_clip_source(src, None, None, **from_pretrained_kwargs)
    student = bcosify_clip(source, b=b, image_processor=processor, tokenizer=tokenizer)
    mean, std, _ = _processor_settings(processor)
    return student, CLIPImageTeacher(source, mean, std)


def distillation_loss(student: BcosCLIPModel, teacher: CLIPImageTeacher, pixel_values: torch.Tensor) -> torch.Tensor:
    """The distillation loss of one batch of images (N, 3, H, W) in [0, 1]."""
    return ImageTowerDistillation(student)(pixel_values, teacher(pixel_values))


def distill_image_tower(
    student: BcosCLIPModel,
    teacher: CLIPImageTeacher,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
) -> list:
    """A short distillation run on a tensor of images: Adam with a cosine schedule (the reference
    recipe), random batches. Returns the loss of every step. For full runs use
    ``examples/bcosify_clip.py`` (checkpoints, resuming, multi-process)."""
    if images.shape[0] < 2:
        raise ValueError("Distillation needs at least 2 images per batch (the loss contrasts images).")
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    student.train()
    losses = []
    for _ in range(steps):
        batch = images[torch.randperm(images.shape[0], generator=generator)[:batch_size]]
        loss = distillation_loss(student, teacher, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    student.eval()
    return losses
