"""B-cosification: convert a pretrained image classifier into a B-cos model.

Any image classifier of transformers converts, and so does a plain PyTorch classifier (an
``nn.Module`` from pixels (N, C, H, W) to logits, given its input normalisation and size).
The source architecture is built again (on the meta device) with the module-type rules of
`rules.py` applied: the source's own modules and forward, each convolution, linear layer, norm,
activation, gate and attention made B-cos. The source's tensors are installed under their own
keys (`copy_tensors_by_key`).

The source's input normalisation is folded exactly into the module that reads the
pixels, which reads the encoding [x, 1-x] (`fold_normalization`); nothing is written into the new
model until every tensor has been validated; and before the model is returned, one float64 pass
checks that its explanations are complete (and, for b = 1 with biases, that it reproduces the
source): `check_exactness`.
"""

import copy
import math
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from .._compat import AutoImageProcessor
from ..configuration_bcos import PLAIN_MODULE_FAMILY, BcosConfig, PlainModuleConfig
from ..configuration_bcos_clip import SUPPORTED_CLIP_TYPES
from ..modeling_bcos import BcosForImageClassification, logits_of
from ..rules import find_pixel_reader
from .exactness import ExactnessError, check_exactness
from .libraries import data_config_settings, is_timm_wrapper, library_record, load_timm_wrapper, timm_data_config

try:
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import no_init_weights

def _image_classifier_names(model_type: str) -> tuple:
    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type, ())
    return (names,) if isinstance(names, str) else tuple(names)


# ----------------------------------------------------------------------------------------------
# Installing the source's tensors
# ----------------------------------------------------------------------------------------------


def set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Install ``tensor`` as the parameter or buffer ``name`` of ``module`` (replacing it).

    Installing rather than copying lets the B-cos model be built on the meta device and take over
    the source's tensors without allocating or copying anything.
    """
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = tensor


def fold_normalization(weight: torch.Tensor, mean, std) -> torch.Tensor:
    """First-layer weights on [x, 1-x] that equal ``weight`` applied to (x - mean) / std.

    (x_c - μ_c)/σ_c = ((1-μ_c)·x_c - μ_c·(1-x_c))/σ_c, so W6[:, c] = W[:, c](1-μ_c)/σ_c and
    W6[:, 3+c] = -W[:, c]μ_c/σ_c. Exact, also at zero-padded borders. Computed in float64.
    """
    w = weight.detach().double()
    mean = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, *([1] * (w.dim() - 2)))
    std = torch.as_tensor(std, dtype=torch.float64).view(1, -1, *([1] * (w.dim() - 2)))
    return torch.cat([w * (1 - mean) / std, -w * mean / std], dim=1).to(weight.dtype)


def copy_tensors_by_key(source: nn.Module, target: nn.Module, reader: nn.Conv2d, mean, std, share: bool = False) -> set:
    """Install every tensor of ``source`` into the module of ``target`` with the same key, where
    ``target`` is the source's architecture B-cosified by the rules (`BcosSourceArchitecture.model`).

    The pixel reader's weight gets the input normalisation folded in. Source biases that the
    B-cos model dropped are the only tensors left over; any other leftover, a missing key or a
    shape that differs raises before anything is written. Returns the ids of the tensors written.
    """
    source_tensors = {**dict(source.named_parameters(remove_duplicate=False)), **dict(source.named_buffers(remove_duplicate=False))}
    target_modules = dict(target.named_modules(remove_duplicate=False))
    reader_name = next(name for name, module in target_modules.items() if module is reader)
    plan = []
    for key, tensor in [*target.named_parameters(remove_duplicate=False), *target.named_buffers(remove_duplicate=False)]:
        module_name, _, tensor_name = key.rpartition(".")
        if key not in source_tensors:
            raise ValueError(f"Cannot convert {type(source).__name__}: the B-cos model's tensor {key!r} has no source tensor.")
        value = source_tensors[key]
        if module_name == reader_name and tensor_name == "weight":
            value = fold_normalization(value, mean, std)
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(
                f"Cannot convert {type(source).__name__}: {key!r} has shape {tuple(value.shape)}, the B-cos model expects {tuple(tensor.shape)}."
            )
        plan.append((target_modules[module_name], tensor_name, value, module_name == reader_name and tensor_name == "weight"))
    written_keys = {key for key, *_ in [*target.named_parameters(remove_duplicate=False), *target.named_buffers(remove_duplicate=False)]}
    for key in sorted(set(source_tensors) - written_keys):
        module_name, _, tensor_name = key.rpartition(".")
        module = target_modules.get(module_name)
        if not (tensor_name == "bias" and module is not None and getattr(module, "bias", "absent") is None):
            raise ValueError(f"Cannot convert {type(source).__name__}: its tensor {key!r} has no place in the B-cos model.")

    written = set()
    with torch.no_grad():
        for module, name, value, folded in plan:
            set_tensor(module, name, value if folded else (value.detach() if share else value.detach().clone()))
            written.add(id(module._parameters[name] if name in module._parameters else module._buffers[name]))
    return written


def check_all_written(model: nn.Module, written: set) -> None:
    """Every tensor must come from the source: never hand out uninitialised memory."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    missing = [n for n, t in tensors if id(t) not in written or t.is_meta]
    if missing:
        raise RuntimeError(f"Conversion left tensors without a source: {missing[:5]}")


def check_conversion_arguments(b, keep_bias) -> None:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
        raise ValueError(f"The B-cos exponent b must be a finite number > 0, got {b!r}.")
    if not isinstance(keep_bias, bool):
        raise TypeError(f"keep_bias must be a bool, got {type(keep_bias).__name__}.")


# ----------------------------------------------------------------------------------------------
# Loading the source
# ----------------------------------------------------------------------------------------------


def _check_model_type(model_type: str, where: str) -> None:
    if model_type in ("bcos", "bcos_clip"):
        raise ValueError(f"{where} is already a B-cos model (model_type {model_type!r}): use it as it is.")
    if not _image_classifier_names(model_type):
        raise ValueError(
            f"Unsupported architecture {model_type!r} ({where}): not an image classifier of transformers "
            "(a model type of AutoModelForImageClassification, such as vit, resnet, convnext, dinov2, swin or "
            "efficientnet). For a plain PyTorch classifier pass the nn.Module itself."
        )


def _is_clip_source(src, **kwargs) -> bool:
    """Whether ``src`` (a model, or a folder / Hub id) is a CLIP model, converted by `bcosify_clip`."""
    if isinstance(src, PreTrainedModel):
        return src.config.model_type in SUPPORTED_CLIP_TYPES
    if isinstance(src, (str, os.PathLike)):
        return AutoConfig.from_pretrained(src, **kwargs).model_type in SUPPORTED_CLIP_TYPES
    return False


def _plain_module_config(module: nn.Module, image_mean, image_std, image_size, record: Optional[tuple] = None, data_config=None) -> tuple:
    """(PlainModuleConfig, number of classes, mean, std) of a plain PyTorch classifier, validated:
    the normalisation has one value per channel, and the module maps such pixels to (1, K) logits.

    A timm model's own data config (``data_config``, or its ``pretrained_cfg``) supplies what is
    not passed. A timm or torchvision model is recorded with the library, architecture and
    arguments that rebuild it (``record``, or found by `library_record`), so that its saved folder
    loads without the module.
    """
    data_config = data_config or timm_data_config(module)
    if data_config is not None:
        mean, std, size = data_config_settings(data_config)
        image_mean, image_std, image_size = image_mean or mean, image_std or std, image_size or size
    if image_mean is None or image_std is None or image_size is None:
        raise ValueError(
            f"{type(module).__name__} is a plain PyTorch module: pass image_mean=, image_std= (the normalisation it was "
            "trained with, one value per channel) and image_size= (the input size it takes)."
        )
    mean = [float(v) for v in (image_mean if isinstance(image_mean, (list, tuple)) else [image_mean])]
    std = [float(v) for v in (image_std if isinstance(image_std, (list, tuple)) else [image_std])]
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise ValueError(f"image_mean and image_std must have one value per pixel channel (1 or 3), got {len(mean)} and {len(std)}.")
    if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
        raise ValueError(f"image_mean must be finite and image_std finite and > 0, got {mean} and {std}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
    if getattr(module, "transform_input", False):
        raise ValueError(
            f"{type(module).__name__} has transform_input=True: it re-normalises its input channels itself, which "
            "the encoding [x, 1 - x] cannot pass through. Set module.transform_input = False and pass "
            "image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5] (what it computes), then convert."
        )
    find_pixel_reader(module, len(mean))  # raises when no convolution reads the pixels
    probe = copy.deepcopy(module).eval()
    try:
        with torch.no_grad():
            logits = logits_of(probe(torch.zeros(1, len(mean), *size, dtype=next(module.parameters()).dtype)))
    except Exception as error:  # noqa: BLE001 - any failure of the caller's code means the same thing here
        raise ValueError(f"{type(module).__name__} does not take ({len(mean)}, {size[0]}, {size[1]}) pixels: {error}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        raise ValueError(f"{type(module).__name__} must return logits of shape (N, classes), got {getattr(logits, 'shape', type(logits).__name__)}.")
    record = record or library_record(module, logits.shape[1], len(mean))
    library, architecture, kwargs = record or (None, "", {})
    config = PlainModuleConfig(
        module_class=f"{type(module).__module__}.{type(module).__qualname__}",
        num_channels=len(mean),
        image_size=list(size),
        image_mean=mean,
        image_std=std,
        library=library,
        architecture=architecture,
        architecture_kwargs=kwargs,
    )
    if library is None:
        warnings.warn(
            f"{type(module).__name__} is not a timm or torchvision model that a config can rebuild (by name, number of "
            "classes and channels): the B-cos model saves its weights and config, and loading them needs an instance of "
            "the class (from_pretrained(folder, source_module=...)).",
            stacklevel=3,
        )
    return config, logits.shape[1], mean, std


def _resizing_processor(config: PlainModuleConfig) -> dict:
    """The image processor of a B-cos timm or torchvision model: resize to its input size
    (bicubic as timm's data configs, bilinear as torchvision's), pixels in [0, 1] (the
    normalisation is folded into the model)."""
    height, width = config.image_size
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": height, "width": width},
        "resample": 3 if config.library == "timm" else 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
    }


def _load_source(src, image_processor, **kwargs):
    if isinstance(src, PreTrainedModel):
        _check_model_type(src.config.model_type, type(src).__name__)
        model = src
    elif isinstance(src, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(src, **kwargs)
        _check_model_type(config.model_type, str(src))
        model = AutoModelForImageClassification.from_pretrained(src, **kwargs)
    else:
        raise TypeError(f"src must be a Hub id, a local folder, a PreTrainedModel or an nn.Module, got {type(src).__name__}.")
    classifiers = _image_classifier_names(model.config.model_type)
    if type(model).__name__ not in classifiers:
        raise ValueError(
            f"Unsupported model class {type(model).__name__}: B-cosification converts image classifiers "
            f"({' or '.join(classifiers)} for model type {model.config.model_type!r})."
        )

    if image_processor is None:
        location = src if not isinstance(src, PreTrainedModel) else getattr(src.config, "_name_or_path", "")
        try:
            image_processor = AutoImageProcessor.from_pretrained(location, **kwargs) if location else None
        except (OSError, ValueError):
            image_processor = None
        if image_processor is None:
            raise ValueError(
                f"No image processor found for {location or type(src).__name__}: pass image_processor= (the processor "
                "the source model was trained with), so that its normalisation can be folded into the first layer."
            )
    return model, image_processor


def _processor_settings(image_processor) -> tuple:
    """(mean, std, dict of the processor that feeds the B-cos model)."""
    settings = image_processor if isinstance(image_processor, dict) else image_processor.to_dict()
    settings = copy.deepcopy(settings)
    if settings.get("do_normalize", False):
        mean, std = settings.get("image_mean"), settings.get("image_std")
        if mean is None or std is None:
            raise ValueError("The image processor normalises but has no image_mean/image_std.")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    settings["do_normalize"] = False
    settings.pop("processor_class", None)
    return mean, std, settings


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def bcosify_pretrained(
    src: Union[str, os.PathLike, PreTrainedModel, nn.Module],
    b: float = 2.0,
    keep_bias: bool = False,
    *,
    image_processor=None,
    image_mean=None,
    image_std=None,
    image_size=None,
    logit_bias: Optional[float] = None,
    check: bool = True,
    **from_pretrained_kwargs,
) -> BcosForImageClassification:
    """B-cosify a pretrained image classifier.

    Args:
        src: a Hub id, a local folder written by ``save_pretrained``, or a model instance: any
            image classifier of transformers (a class of ``AutoModelForImageClassification``), or
            a plain PyTorch classifier (an ``nn.Module`` from (N, C, H, W) pixels, C = 1 or 3, to
            logits, whose first convolution reads the pixels). The B-cos model of a plain module
            runs a copy of it; it saves like any other, and loads with
            ``BcosForImageClassification.from_pretrained(folder, source_module=<an instance of its class>)``.
        b: the B-cos exponent (2 for B-cos models; 1 with ``keep_bias=True`` reproduces the source).
        keep_bias: keep biases and batch-norm centring (False for B-cos models).
        image_processor: the source's image processor (object or dict), if it cannot be loaded from
            ``src``. Its mean/std are folded into the first layer; the B-cos model's processor is
            the same without normalisation.
        image_mean, image_std, image_size: for a plain PyTorch module (only): the normalisation it
            was trained with (one value per channel) and the input size it takes (int or (H, W)).
        logit_bias: the fixed constant added to every logit; by default -log(C-1), or 0 with
            ``keep_bias=True`` so that the source logits are reproduced.
        check: run `check_exactness` before returning (one float64 pass on a small random image:
            0.3 s for DINOv2-S, 3.9 s for ViT-B/16 at its fixed 224 px; BENCHMARKS.md): it raises an `ExactnessError` naming the
            modules that break completeness (or, for b = 1 with biases, equivalence).
        from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``, ...).

    Returns:
        A `BcosForImageClassification` in the source's dtype, in eval mode.
    """
    check_conversion_arguments(b, keep_bias)
    if _is_clip_source(src, **from_pretrained_kwargs):
        from .clip import bcosify_clip  # imported here: conversion/clip.py imports this module

        if logit_bias is not None:
            raise ValueError("logit_bias applies to image classifiers; a B-cos CLIP model has no logit bias.")
        tokenizer = from_pretrained_kwargs.pop("tokenizer", None)
        return bcosify_clip(
            src, b=b, keep_bias=keep_bias, image_processor=image_processor, tokenizer=tokenizer, check=check,
            **from_pretrained_kwargs,
        )
    timm_wrapper = is_timm_wrapper(src, **from_pretrained_kwargs)
    plain_module = isinstance(src, nn.Module) and not isinstance(src, PreTrainedModel)
    if not (plain_module or timm_wrapper) and (image_mean, image_std, image_size) != (None, None, None):
        raise ValueError(
            "image_mean, image_std and image_size apply to plain PyTorch modules; a transformers model's normalisation "
            "comes from its image processor (pass image_processor= if it cannot be loaded with the model)."
        )
    if plain_module and (image_processor is not None or from_pretrained_kwargs):
        unexpected = ["image_processor"] * (image_processor is not None) + sorted(from_pretrained_kwargs)
        raise ValueError(f"{', '.join(unexpected)} do not apply to a plain PyTorch module (pass image_mean=, image_std=, image_size=).")
    if plain_module or timm_wrapper:
        source, data_config, labels, record = load_timm_wrapper(src, **from_pretrained_kwargs) if timm_wrapper else (src, None, None, None)
        backbone_config, num_labels, mean, std = _plain_module_config(source, image_mean, image_std, image_size, record, data_config)
        labels = labels or {"num_labels": num_labels}
        processor_dict = _resizing_processor(backbone_config) if backbone_config.library else None
    else:
        source, processor = _load_source(src, image_processor, **from_pretrained_kwargs)
        mean, std, processor_dict = _processor_settings(processor)
        backbone_config = copy.deepcopy(source.config)
        # The source's class, which the config of a model built in code does not name: DeiT has two.
        backbone_config.architectures = [type(source).__name__]
        # Some configs (PVT) keep only num_labels, no label names.
        names = source.config.id2label
        labels = {"id2label": dict(names), "label2id": dict(source.config.label2id)} if names else {"num_labels": source.config.num_labels}

    config = BcosConfig(
        backbone_config=backbone_config,
        b=b,
        use_bias=keep_bias,
        logit_bias=(0.0 if keep_bias else None) if logit_bias is None else logit_bias,
        normalize_weights=False,
        image_processor=processor_dict,
        **labels,
    )
    # Built on the meta device: every tensor is then installed from the source, none allocated twice.
    with torch.device("meta"), no_init_weights():
        model = BcosForImageClassification(config, source_module=source if config.backbone_family == PLAIN_MODULE_FAMILY else None)
    share = isinstance(src, (str, os.PathLike))
    written = copy_tensors_by_key(source, model.backbone.model, model.backbone.pixel_reader, mean, std, share)
    check_all_written(model, written)
    model.eval()
    if check:
        check_exactness(model, source if (b == 1 and keep_bias) else None, mean, std)
    return model
